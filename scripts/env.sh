# Sourced by the scripts: a private runtime dir keeps Mesa quiet on headless machines.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d /tmp/llama-webgpu-xdg.XXXXXX)}"

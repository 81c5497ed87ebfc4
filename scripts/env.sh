# Sourced by the scripts: a private runtime dir keeps Mesa quiet on headless machines.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  # One per user, not one per shell: it only has to exist and be private.
  export XDG_RUNTIME_DIR="/tmp/llama-webgpu-xdg-$(id -u)"
  mkdir -p -m 700 "$XDG_RUNTIME_DIR"
fi

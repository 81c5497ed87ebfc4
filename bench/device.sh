#!/usr/bin/env bash
# The whole GPU check in one run, for a machine lent for a few minutes (an NVIDIA H100/H200 with
# Vulkan): build here, run there, each result as JSON under $OUT and a short table last.
#
#   bench/device.sh build   here: the release CLI and the GPU test binaries, stripped and compressed, into
#                           target/device, and the CLI of commit $BASELINE for a ratio in the same call
#   bench/device.sh run     there (in the repository root; carry target/device, .gl and
#                           target/models/llama3-tokenizer, the engine tests' tokenizer: 28 MB): kernel,
#                           model and engine tests on the GPU, then the benchmarks below
#   bench/device.sh summary DIR   the tables of a run's JSON files again (bench/results/*)
#   bench/device.sh build-dawn   here: the web build, dawn.node and a Node binary (compressed), the
#                           CLI and the tiny fixture's shards into target/dawn (about 40 MB)
#   bench/device.sh dawn    there (carrying target/dawn and .gl): the wasm engine on Dawn under
#                           Node (bench/dawn.mjs): the fixture's tokens against native, then 1B and 8B
#                           q4_0 pp/tg (and tg on int8 inputs, and with the GEMVs reducing through
#                           workgroup memory as browsers without subgroups do) beside the native CLI's in the same
#                           call, as a ratio (prefill also against native on the portable tiles, the
#                           kernels a browser has)
#
# The 8B runs: pp512/tg128 (with the card's bandwidth; prefill on cooperative matrices where the
# card has them) and the same on the portable tiles (--no-coop-matrix, or only its attention:
# --no-coop-attention) and in tiles of 64 or 128 only (--coop-tile), profiled, --sync, --f16-tiles,
# pp512 with 8x8 register tiles (f32 and f16 tiles), tg128 without key splits, 4096 deep, with the
# key splits merged in a dispatch of their own (tg128 and 4096 deep), the
# plain reduction, naga's bounds checks kept (as in a browser), 1/2/4 GEMV rows per workgroup;
# decode on q8 inputs (--q8-activations: alone, profiled, with --parallel; q8_0, q4_k and 1B too);
# quant values converted from integers instead of made from float bits (--int-conversions, q8_0 too);
# q8_0, q4_k, q5_k, iq4_xs, q3_k, q2_k, iq3_s, iq2_xxs; 1B, 3B and 70B.
# run's knobs, for a rehearsal on a slow adapter: LAYERS=1 (fewer layers of every shape), P=512,
# N=128 (prompt and generation lengths), DEPTH=4096, REPS=3, SKIP_TESTS=1; ONLY="8b-q4_0 ..." runs
# just the benchmarks named; BUDGET=540 (seconds from the start after which no benchmark starts:
# a call may run 600; the ones left are named for a later call's ONLY).
set -uo pipefail
cd "$(dirname "$0")/.."
dir=target/device
# The commit whose CLI runs beside this one (runs named baseline-*), so that each change is
# measured as a ratio in one call: the last one measured on a GPU before it. Empty: none.
BASELINE=${BASELINE-8db48fd}

# The Vulkan and GL loaders' Debian packages, for a machine that lacks them (bench/NOTES.md).
fetch_loaders() {
    compgen -G ".gl/*.deb" >/dev/null && return
    mkdir -p .gl
    (cd .gl && apt-get download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
}

build() {
    fetch_loaders
    cargo build --release --locked
    rm -rf "$dir" && mkdir -p "$dir"
    cp target/release/llama-webgpu "$dir/"
    local tests=(kernels model engine)
    local args=()
    for t in "${tests[@]}"; do args+=(--test "$t"); done
    cargo test --release --locked --no-run "${args[@]}" --message-format=json |
        python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], sys.argv[1] + "/" + m["target"]["name"])
' "$dir"
    strip "$dir"/*
    if [ -n "$BASELINE" ]; then
        # Built in this target folder, so that only the crate itself compiles again; its binary
        # takes target/release's place until this commit's is put back.
        local tree=target/baseline-src
        git worktree remove --force "$tree" 2>/dev/null
        git worktree add --detach "$tree" "$BASELINE" &&
            (cd "$tree" && CARGO_TARGET_DIR=.. cargo build --release --locked) &&
            strip -o "$dir/baseline" target/release/llama-webgpu && xz -f -T0 "$dir/baseline" || return 1
        git worktree remove --force "$tree"
        cargo build --release --locked
        strip -o target/device-check target/release/llama-webgpu
        cmp -s target/device-check "$dir/llama-webgpu" || { echo "target/release holds another commit's CLI"; return 1; }
        rm target/device-check
    fi
    # Compressed: with the tokenizer and the working tree they travel under the 64 MiB a call carries.
    xz -f -T0 "$dir/llama-webgpu" "$dir/kernels" "$dir/model" "$dir/engine"
    # The tests find their fixtures under the path they were built in.
    pwd >"$dir/built-in"
    ls -la "$dir"
    du -sh "$dir"
}

run() {
    # Only a few files come back from the machine: every result goes to $work, packed into one
    # archive under $OUT after each step (so a run cut short still returns what it finished).
    local out=${OUT:-target/device-out} work=${WORK:-/tmp/device-results}
    # A call may run 600 s: stop starting benchmarks in time to write the summary, and say which
    # were left (ONLY= runs them in a later call).
    local deadline=$((SECONDS + ${BUDGET:-540}))
    # A warm machine keeps /tmp between calls: start empty, so a table holds this run alone.
    rm -rf "$work"
    mkdir -p "$out" "$work"
    pack() { tar -czf "$out/results.tar.gz" -C "$work" .; }
    # The binaries, unpacked where the machine has room.
    local bins=/tmp/llama-webgpu-device
    mkdir -p "$bins"
    for packed in "$dir"/*.xz; do
        local unpacked=$bins/$(basename "$packed" .xz)
        [ -x "$unpacked" ] && [ "$unpacked" -nt "$packed" ] || { xz -dc "$packed" >"$unpacked" && chmod +x "$unpacked"; }
    done
    local bin=$bins/llama-webgpu baseline=$bins/baseline
    local built_in
    built_in=$(cat "$dir/built-in")
    if [ "$built_in" != "$PWD" ] && [ ! -e "$built_in" ]; then
        mkdir -p "$(dirname "$built_in")" && ln -s "$PWD" "$built_in"
    fi
    install_loaders
    find_vulkan_driver "$bin" "$work" || { pack; return 1; }
    cat "$work/info.txt"
    local bandwidth=""
    grep -q "H200" "$work/info.txt" && bandwidth="--bandwidth-gbps 4800"
    grep -q "H100" "$work/info.txt" && bandwidth="--bandwidth-gbps 3350"

    local failed=()
    # Where the card lists the configuration tiled_coop takes, its tests must not skip.
    if grep -q "cooperative matrix: 16x16x16 F16 -> F32" "$work/info.txt"; then
        export LLAMA_WEBGPU_REQUIRE_COOP_MATRIX=1
    fi
    if [ -z "${SKIP_TESTS:-}" ]; then
        for t in kernels model engine; do
            if LLAMA_WEBGPU_REQUIRE_GPU=1 timeout 300 "$bins/$t" >"$work/test-$t.txt" 2>&1; then
                echo "tests $t: passed"
            else
                echo "tests $t: FAILED (see test-$t.txt)"
                failed+=("test-$t")
            fi
            tail -3 "$work/test-$t.txt"
            pack
        done
    fi

    local layers=${LAYERS:+--layers $LAYERS} p=${P:-512} n=${N:-128} depth=${DEPTH:-4096} reps=${REPS:-3}
    # Two paths no GPU has run before: the key splits merged by the last split to finish (needs
    # storage barriers that order memory device-wide) and prefill on cooperative matrices (16x16
    # fragments; lavapipe's tests run 8x8). Should this driver break either, a load's self-test
    # fails (the kernel tests say where): then every run takes the option that steps around it,
    # so the rest still measures.
    local fallback=""
    load_check() {
        # shellcheck disable=SC2086 # layers and the options are flags
        timeout 120 "$bin" bench --synthetic llama3.2-1b --quant q4_0 -p 0 -n 4 -d 64 -r 1 $layers "$@" --json -q >"$work/load-check.json" 2>>"$work/load-check.err"
    }
    if ! load_check; then
        for options in "--separate-split-merge" "--coop-tile=64" "--separate-split-merge --coop-tile=64" "--no-coop-attention" "--separate-split-merge --no-coop-attention" "--no-coop-matrix" "--separate-split-merge --no-coop-matrix"; do
            # shellcheck disable=SC2086 # the options are flags
            if load_check $options; then fallback=$options; break; fi
        done
        echo "a load failed its self-test (load-check.err): every run takes '${fallback:-none passed}'"
        echo "${fallback:-none passed}" >"$work/fallback.txt"
    fi
    rm -f "$work/load-check.json"
    # name, then the bench arguments.
    local runs=(
        # What the open issues need first (a run cut short keeps them), the tuning A/Bs last.
        "8b-q4_0|--synthetic llama3.1-8b --quant q4_0 -p $p -n $n"
        "baseline-8b-q4_0|--synthetic llama3.1-8b --quant q4_0 -p $p -n $n"
        "8b-q4_0-no-coop|--synthetic llama3.1-8b --quant q4_0 -p $p -n 0 --no-coop-matrix"
        "8b-q4_0-no-coop-attention|--synthetic llama3.1-8b --quant q4_0 -p $p -n 0 --no-coop-attention"
        "8b-q4_0-q8-activations|--synthetic llama3.1-8b --quant q4_0 -p 0 -n $n --q8-activations"
        "8b-q4_0-int-conversions|--synthetic llama3.1-8b --quant q4_0 -p $p -n $n --int-conversions"
        "8b-q4_0-parallel|--synthetic llama3.1-8b --quant q4_0 -p $p -n $n -r 2 --parallel 1,4,7,16,32"
        "8b-q4_0-profile|--synthetic llama3.1-8b --quant q4_0 -p $p -n $n -r 1 --profile"
        "8b-q4_0-q8-activations-profile|--synthetic llama3.1-8b --quant q4_0 -p 0 -n $n -r 1 --profile --q8-activations"
        "8b-q4_0-q8-activations-parallel|--synthetic llama3.1-8b --quant q4_0 -p 0 -n $n -r 2 --parallel 1,4,16,32 --q8-activations"
        "8b-q4_0-depth|--synthetic llama3.1-8b --quant q4_0 -p 0 -n 32 -d $depth --profile"
        "8b-q4_0-depth-separate-split-merge|--synthetic llama3.1-8b --quant q4_0 -p 0 -n 32 -d $depth --profile --separate-split-merge"
        "8b-q4_0-depth-32k|--synthetic llama3.1-8b --quant q4_0 -p 0 -n 32 -d 32768 -r 1"
        "8b-q4_0-depth-32k-kv-q8_0|--synthetic llama3.1-8b --quant q4_0 -p 0 -n 32 -d 32768 -r 1 --kv-type q8_0"
        "8b-q4_0-context-128k|--synthetic llama3.1-8b --quant q4_0 -p 0 -n 32 -r 1 --context 131072"
        "70b-q4_0|--synthetic llama3.1-70b --quant q4_0 -p $p -n 32 -r 1"
        "1b-q4_0|--synthetic llama3.2-1b --quant q4_0 -p $p -n $n"
        "baseline-1b-q4_0|--synthetic llama3.2-1b --quant q4_0 -p $p -n $n"
        "3b-q4_0|--synthetic llama3.2-3b --quant q4_0 -p $p -n $n"
        "8b-q4_0-coop-tile-64|--synthetic llama3.1-8b --quant q4_0 -p $p -n 0 --coop-tile=64"
        "8b-q4_0-coop-tile-128|--synthetic llama3.1-8b --quant q4_0 -p $p -n 0 --coop-tile=128"
        "8b-q8_0|--synthetic llama3.1-8b --quant q8_0 -p $p -n $n"
        "baseline-8b-q8_0|--synthetic llama3.1-8b --quant q8_0 -p $p -n $n"
        "8b-q8_0-q8-activations|--synthetic llama3.1-8b --quant q8_0 -p 0 -n $n --q8-activations"
        "8b-q8_0-int-conversions|--synthetic llama3.1-8b --quant q8_0 -p 0 -n $n --int-conversions"
        "1b-q4_0-q8-activations|--synthetic llama3.2-1b --quant q4_0 -p 0 -n $n --q8-activations"
        "8b-q4_k|--synthetic llama3.1-8b --quant q4_k -p 0 -n $n"
        "8b-q4_k-q8-activations|--synthetic llama3.1-8b --quant q4_k -p 0 -n $n --q8-activations"
        "8b-q5_k|--synthetic llama3.1-8b --quant q5_k -p 0 -n $n"
        "8b-iq4_xs|--synthetic llama3.1-8b --quant iq4_xs -p 0 -n $n"
        "8b-q3_k|--synthetic llama3.1-8b --quant q3_k -p 0 -n $n"
        "8b-q2_k|--synthetic llama3.1-8b --quant q2_k -p 0 -n $n"
        "8b-iq3_s|--synthetic llama3.1-8b --quant iq3_s -p 0 -n $n"
        "8b-iq2_xxs|--synthetic llama3.1-8b --quant iq2_xxs -p 0 -n $n"
        "8b-bf16|--synthetic llama3.1-8b --quant bf16 -p $p -n $n"
        "8b-q4_0-parallel-tiles|--synthetic llama3.1-8b --quant q4_0 -p 0 -n $n -r 2 --parallel 16,32 --gemv-max-tokens 1"
        "8b-q4_0-separate-split-merge|--synthetic llama3.1-8b --quant q4_0 -p 0 -n $n --separate-split-merge"
        "8b-q4_0-one-split|--synthetic llama3.1-8b --quant q4_0 -p 0 -n $n --max-key-splits 1 --profile"
        "8b-q4_0-sync|--synthetic llama3.1-8b --quant q4_0 -p 0 -n $n --sync"
        "8b-q4_0-bounds-checks|--synthetic llama3.1-8b --quant q4_0 -p $p -n $n --bounds-checks --profile"
        "8b-q4_0-f16-tiles|--synthetic llama3.1-8b --quant q4_0 -p $p -n 0 --f16-tiles --profile"
        "8b-q4_0-register-tile-8|--synthetic llama3.1-8b --quant q4_0 -p $p -n 0 --register-tile 8 --profile"
        "8b-q4_0-register-tile-8-f16|--synthetic llama3.1-8b --quant q4_0 -p $p -n 0 --register-tile 8 --f16-tiles --profile"
        "8b-q4_0-plain-reduction|--synthetic llama3.1-8b --quant q4_0 -p 0 -n $n --no-subgroups"
        "8b-q4_0-rows1|--synthetic llama3.1-8b --quant q4_0 -p 0 -n $n --gemv-rows 1 --profile"
        "8b-q4_0-rows2|--synthetic llama3.1-8b --quant q4_0 -p 0 -n $n --gemv-rows 2 --profile"
        "8b-q4_0-rows4|--synthetic llama3.1-8b --quant q4_0 -p 0 -n $n --gemv-rows 4 --profile"
    )
    local left=()
    for entry in "${runs[@]}"; do
        local name=${entry%%|*} args=${entry#*|}
        [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || continue
        local remaining=$((deadline - SECONDS))
        if [ "$remaining" -lt 30 ]; then
            left+=("$name")
            continue
        fi
        [[ " $args " == *" -r "* ]] || args="$args -r $reps"
        local runner=$bin
        if [[ $name == baseline-* ]]; then
            [ -x "$baseline" ] || continue
            runner=$baseline
        else
            # The fallback's options whose flag a run does not have already (--flag=value too).
            for option in $fallback; do
                [[ " $args " =~ \ ${option%%=*}[\ =] ]] || args="$args $option"
            done
        fi
        # shellcheck disable=SC2086 # the arguments are words
        if timeout $((remaining < 240 ? remaining : 240)) "$runner" bench $args $layers $bandwidth --json -q >"$work/$name.json" 2>"$work/$name.err"; then
            echo "bench $name: done"
        else
            echo "bench $name: FAILED: $(tail -2 "$work/$name.err")"
            failed+=("$name")
        fi
        pack
    done
    [ ${#left[@]} -eq 0 ] || echo "left for lack of time (BUDGET=${BUDGET:-540} s): ONLY=\"${left[*]}\"" | tee "$work/left.txt"
    pack
    summary "$work" | tee "$out/summary.md"
    [ ${#failed[@]} -eq 0 ] || { echo "failed: ${failed[*]}"; return 1; }
}

# The Vulkan and GL loaders, where the machine lacks them (.gl holds their Debian packages).
# NVIDIA's Vulkan driver is its GLX library, which finds no GPU without libglvnd's.
install_loaders() {
    if compgen -G ".gl/*.deb" >/dev/null; then
        for f in .gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
    fi
}

WEBGPU_VERSION=0.6.2

build_dawn() {
    local dawn=target/dawn
    fetch_loaders
    cargo build --release --locked
    scripts/build-web
    rm -rf "$dawn" && mkdir -p "$dawn/pkg" "$dawn/webgpu/dist/linux-x64"
    cp pkg/*.js pkg/*.wasm pkg/package.json "$dawn/pkg/"
    npm install --no-package-lock --no-audit --no-fund --silent --ignore-scripts --prefix target/dawn-npm "webgpu@$WEBGPU_VERSION"
    local webgpu=target/dawn-npm/node_modules/webgpu
    cp "$webgpu/index.js" "$webgpu/package.json" "$dawn/webgpu/"
    xz -T0 -6 -c "$webgpu/dist/linux-x64/dawn.node" >"$dawn/webgpu/dist/linux-x64/dawn.node.xz"
    xz -T0 -6 -c "$(readlink -f "$(command -v node)")" >"$dawn/node.xz"
    strip -o "$dawn/llama-webgpu" target/release/llama-webgpu
    xz -T0 -6 "$dawn/llama-webgpu"
    node -e 'import("./scripts/fixture.mjs").then((m) => m.prepareTinyShards(process.cwd(), "target/release/llama-webgpu", "target/dawn"))'
    rm -rf "$dawn/tiny-llama31-src"
    du -sh "$dawn"
}

dawn() {
    local dawn=target/dawn out=${OUT:-target/device-out} work=${WORK:-/tmp/device-results}
    rm -rf "$work"
    mkdir -p "$out" "$work"
    pack() { tar -czf "$out/results.tar.gz" -C "$work" .; }
    install_loaders
    local binary
    for binary in llama-webgpu node; do
        [ -x "$dawn/$binary" ] || { xz -dc "$dawn/$binary.xz" >"$dawn/$binary" && chmod +x "$dawn/$binary"; }
    done
    find_vulkan_driver "$dawn/llama-webgpu" "$work" || { pack; return 1; }
    cat "$work/info.txt"
    local addon=$dawn/webgpu/dist/linux-x64/dawn.node
    [ -f "$addon" ] || xz -dc "$addon.xz" >"$addon"
    local p=${P:-512} n=${N:-128} reps=${REPS:-3} models=${MODELS:-llama3.2-1b llama3.1-8b}
    for model in $models; do
        # Decode on int8 inputs too (named MODEL+q8), beside Dawn's; and prefill on the portable
        # tiles (MODEL+portable), the kernels a browser runs, where the card has cooperative matrices.
        for variant in "$model|-p $p -n $n" "$model+q8|-p 0 -n $n --q8-activations" "$model+portable|-p $p -n 0 --no-coop-matrix"; do
            local name=${variant%%|*} args=${variant#*|}
            # shellcheck disable=SC2086 # LAYERS and args are flags
            timeout 240 "$dawn/llama-webgpu" bench --synthetic "$model" --quant q4_0 $args -r "$reps" ${LAYERS:+--layers $LAYERS} --json -q \
                >"$work/native-$name.json" 2>"$work/native-$name.err" || echo "native $name: FAILED: $(tail -2 "$work/native-$name.err")"
            pack
        done
    done
    local status=0
    # shellcheck disable=SC2086 # LAYERS is a flag or nothing
    timeout 480 "$dawn/node" bench/dawn.mjs --webgpu "$dawn" --pkg "$dawn/pkg" --cli "$dawn/llama-webgpu" --check "$dawn/tiny-llama31" \
        --synthetic "$(echo $models | tr ' ' ,)" -p "$p" -n "$n" -r "$reps" --q8-activations --no-subgroups ${LAYERS:+--layers $LAYERS} --out "$work/dawn.json" \
        >/dev/null 2>"$work/dawn.err" || status=$?
    tail -20 "$work/dawn.err"
    pack
    dawn_summary "$work" | tee "$out/summary.md"
    return $status
}

# Native and Dawn tok/s side by side, and what Dawn offers.
dawn_summary() {
    python3 - "$1" <<'EOF'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
mean = lambda xs: sum(xs) / len(xs)
dawn_path = work / "dawn.json"
dawn = json.loads(dawn_path.read_text()) if dawn_path.exists() and dawn_path.read_text() else None
if dawn:
    print(f"Dawn: {dawn['dawn']['adapter']}\nfeatures: {', '.join(dawn['dawn']['features'])}")
    limits = dawn["dawn"]["limits"]
    print(f"maxStorageBufferBindingSize {limits.get('maxStorageBufferBindingSize')}, maxComputeWorkgroupStorageSize {limits.get('maxComputeWorkgroupStorageSize')}")
    if dawn["check"]:
        print(f"tiny fixture tokens equal to native: {dawn['check']['equal']}")
def native_means(path):
    text = path.read_text() if path.exists() else ""
    return {r["test"]: mean(r["samples"]) for r in json.loads(text.splitlines()[0])["results"]} if text else {}
print("\n| model | test | native tok/s | Dawn tok/s | Dawn / native | native portable tok/s | Dawn / native portable |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
for path in sorted(work.glob("native-*.json")):
    model = path.stem.removeprefix("native-")
    if model.endswith("+portable"):
        continue
    native, portable = native_means(path), native_means(work / f"native-{model}+portable.json")
    # Dawn's decode with the workgroup-memory reduction (--no-subgroups) beside native's as it is.
    for suffix, no_subgroups in [("", False), (" (Dawn without subgroups)", True)]:
        web = next((r for r in (dawn or {}).get("results", [])
                    if r["model"] + ("+q8" if r.get("q8_activations") else "") == model and bool(r.get("no_subgroups")) == no_subgroups), None)
        if no_subgroups and not web:
            continue
        web = {r["test"]: mean(r["tokens_per_second"]) for r in web["results"]} if web else {}
        for test in sorted(set(native) | set(web)):
            n, w, p = native.get(test), web.get(test), portable.get(test)
            if no_subgroups and not w:
                continue
            ratio = lambda a, b: f"{a / b:.2f}" if a and b else "-"
            print(f"| {model}{suffix} | {test} | {n or 0:.1f} | {w or 0:.1f} | {ratio(w, n)} | {f'{p:.1f}' if p else '-'} | {ratio(w, p)} |")
EOF
}

# The first driver setup under which the CLI finds a GPU: the loader's own search, NVIDIA's ICD
# manifest, then a manifest naming the driver library by its full path (a machine can hold a stale
# copy of it on the default library path). Exports what worked; the loader's log where none did.
find_vulkan_driver() {
    local bin=$1 work=$2 nvidia=/usr/local/nvidia
    local manifest=/tmp/nvidia_icd_full_path.json
    local glx
    glx=$(ls "$nvidia"/lib64/libGLX_nvidia.so.0 "$nvidia"/lib64/libGLX_nvidia.so* 2>/dev/null | head -1)
    [ -n "$glx" ] && printf '{"file_format_version": "1.0.1", "ICD": {"library_path": "%s", "api_version": "1.3.0"}}\n' "$glx" >"$manifest"
    local setups=(
        ""
        "VK_DRIVER_FILES=$nvidia/share/vulkan/icd.d/nvidia_icd.json"
        "VK_DRIVER_FILES=$manifest LD_LIBRARY_PATH=$nvidia/lib64"
    )
    for setup in "${setups[@]}"; do
        # shellcheck disable=SC2086 # the setup is assignments
        if env $setup "$bin" info >"$work/info.txt" 2>&1; then
            echo "Vulkan driver setup: ${setup:-default}"
            # shellcheck disable=SC2163,SC2086
            for assignment in $setup; do export "$assignment"; done
            return 0
        fi
    done
    {
        ldconfig -p | grep -i -e vulkan -e GLX_nvidia -e GLdispatch
        ls -la /usr/lib/libGLX_nvidia* "$nvidia"/lib64/libGLX_nvidia* "$nvidia"/lib64/libnvidia-glcore*
        env | grep -i nvidia
        [ -n "$glx" ] && ldd "$glx" | grep "not found"
        VK_LOADER_DEBUG=error,warn,driver VK_DRIVER_FILES=$manifest LD_LIBRARY_PATH=$nvidia/lib64 "$bin" info
    } >"$work/vulkan-diagnosis.txt" 2>&1
    head -c 8000 "$work/vulkan-diagnosis.txt"
    echo "no Vulkan driver setup found the GPU"
    return 1
}

# One line per test of every bench JSON, then the decode profile of the 8B run.
summary() {
    python3 - "$1" <<'EOF' || cat "$1"/*.json
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
first = next((p for p in sorted(out.glob("*.json")) if p.read_text()), None)
if first:
    report = json.loads(first.read_text().splitlines()[0])
    print(f"\n{report['adapter']} ({report['backend']}), commit {report.get('commit', 'unknown')}")
eight_b = out / "8b-q4_0.json"
if eight_b.exists() and eight_b.read_text():
    tiles = json.loads(eight_b.read_text().splitlines()[0]).get("coop_large_tiles_from_tokens")
    if tiles:
        print(f"8B's products on tiles of 128 (cooperative matrices) from passes of (tokens): {tiles}")
print(f"\n| run | test | tok/s | std | of bandwidth | CPU encode us/token | dispatches/token |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
for path in sorted(out.glob("*.json")):
    lines = path.read_text().splitlines()
    if not lines:
        continue
    report = json.loads(lines[0])
    for r in report["results"]:
        fraction = r.get("bandwidth_fraction")
        encode = r.get("cpu_encode_us_per_token")
        test = r['test'] if r.get('parallel', 1) == 1 else f"{r['test']} x{r['parallel']}"
        print(f"| {path.stem} | {test} | {r['tokens_per_second']:.1f} | {r['std']:.1f} | "
              f"{'-' if fraction is None else f'{100 * fraction:.1f}%'} | {'-' if encode is None else f'{encode:.0f}'} | "
              f"{report['dispatches_per_token']} |")
def means(path):
    lines = path.read_text().splitlines() if path.exists() else []
    return {r["test"]: r["tokens_per_second"] for r in json.loads(lines[0])["results"]} if lines else {}
for path in sorted(out.glob("baseline-*.json")):
    name = path.stem.removeprefix("baseline-")
    old, new = means(path), means(out / f"{name}.json")
    lines = path.read_text().splitlines()
    commit = json.loads(lines[0]).get("commit", "unknown") if lines else "unknown"
    for test in sorted(set(old) & set(new)):
        print(f"\n{name} {test}: {new[test]:.1f} tok/s against {old[test]:.1f} at baseline {commit[:8]}: x{new[test] / old[test]:.3f}", end="")
# Each option's run against its twin without it, same binary: decode on int8 inputs against f32
# inputs, the key splits' merge in a dispatch of its own against the last split's, prefill on the
# portable tiles (all of it, or its attention) against cooperative matrices.
twins = [
    ("-q8-activations", "on int8 inputs", "on f32"),
    ("-int-conversions", "with quant values converted from integers", "made from float bits"),
    ("-separate-split-merge", "merged in a dispatch", "by the last split"),
    ("-no-coop", "on portable tiles", "on cooperative matrices"),
    ("-no-coop-attention", "with attention on portable tiles", "with it on cooperative matrices"),
    ("-coop-tile-64", "in tiles of 64 on cooperative matrices", "in tiles by pass size"),
    ("-coop-tile-128", "in tiles of 128 on cooperative matrices", "in tiles by pass size"),
]
# A fallback (see run) that took a twin's option for every run leaves nothing to compare.
fallback = (out / "fallback.txt").read_text().split() if (out / "fallback.txt").exists() else []
same_under = {
    "-separate-split-merge": ["--separate-split-merge"],
    "-no-coop": ["--no-coop-matrix"],
    "-no-coop-attention": ["--no-coop-attention", "--no-coop-matrix"],
    "-coop-tile-64": ["--coop-tile=64", "--no-coop-matrix"],
    "-coop-tile-128": ["--no-coop-matrix"],
}
for suffix, on_what, off_what in twins:
    if any(option in fallback for option in same_under.get(suffix, [])):
        continue
    for path in sorted(out.glob(f"*{suffix}.json")):
        name = path.stem.removesuffix(suffix)
        off, on = means(out / f"{name}.json"), means(path)
        for test in sorted(set(off) & set(on)):
            print(f"\n{name} {test}: {on[test]:.1f} tok/s {on_what} against {off[test]:.1f} {off_what}: x{on[test] / off[test]:.3f}", end="")
if (out / "fallback.txt").exists():
    print(f"\na load failed its self-test on this card: every run took '{(out / 'fallback.txt').read_text().strip()}'", end="")
print()
for profile in [out / "8b-q4_0-profile.json", out / "8b-q4_0-q8-activations-profile.json"]:
    if not profile.exists() or not profile.read_text():
        continue
    report = json.loads(profile.read_text().splitlines()[0])
    print(f"\n{profile.stem}\n\n| kernel | dispatches/token | us/token | GB/s |")
    print("| --- | ---: | ---: | ---: |")
    for k in report["profile"] or []:
        print(f"| {k['kernel']} | {k['dispatches_per_token']:.0f} | {k['us_per_token']:.1f} | {k['gbps']:.0f} |")
    prefill = next((json.loads(line) for line in profile.read_text().splitlines()[1:]), None)
    if prefill:
        print(f"\nprefill pass of {prefill['prefill_tokens']} tokens: {prefill['prefill_ms']:.0f} ms\n")
        print("| kernel | dispatches/pass | ms/pass |")
        print("| --- | ---: | ---: |")
        for k in prefill["prefill_profile"]:
            print(f"| {k['kernel']} | {k['dispatches']:.0f} | {k['ms_per_pass']:.1f} |")
EOF
}

case "${1:-}" in
    build) build ;;
    run) run ;;
    summary) summary "$2" ;;
    build-dawn) build_dawn ;;
    dawn) dawn ;;
    *) echo "usage: $0 build|run|summary DIR|build-dawn|dawn" >&2; exit 2 ;;
esac

#!/bin/sh
# One-shot init job (docker compose service `init`, trainer image):
#   1. if the model store has no bundle for $CTR_MODEL_NAME, train a small model on the
#      synthetic data set and export it there;
#   2. bulk-load users, sequences and item features into Redis ($CTR_REDIS_URL), from the
#      data the newest bundle was trained on (its manifest's config), unless Redis holds
#      that data already (`ctr load --once`: the last complete load was of the same
#      config), so that an `up` or a `compose run` of a dependant keeps the histories
#      events have moved on since.
# Settings (env): CTR_MODELS_DIR, CTR_MODEL_NAME, CTR_REDIS_URL,
#   CTR_INIT_CONFIG      feature config (default configs/synthetic_din.yaml)
#   CTR_INIT_TRAIN_SET   space-separated --set overrides (default "train.epochs=2";
#                        set but empty = none: the config trains as written)
#   CTR_INIT_FORCE_TRAIN 1 = train and export a new version even when one exists
#   CTR_INIT_LOAD        1 (default) = load when Redis does not hold this data yet;
#                        force = load even so (resets user histories to the data set's);
#                        0 = never load
set -eu
# This shell is the container's PID 1, which ignores SIGTERM without a handler: `docker
# stop` never reached `ctr train` / `ctr export`, killed after the grace period without
# their clean-up. Each step runs in the background, and a SIGTERM or SIGINT is passed
# on to it; the step's own clean-up then ends it (exit 143 or 130), and so this job.
child=""
forward() {
    if [ -n "$child" ]; then kill -s "$1" "$child" 2>/dev/null || true; fi
}
trap 'forward TERM' TERM
# a step started with & ignores SIGINT (a non-interactive shell's rule, which Python
# keeps): Ctrl-C is passed on as SIGTERM, which every ctr command cleans up after too
trap 'forward TERM' INT
run() {
    "$@" &
    child=$!
    status=0
    wait "$child" || status=$?
    # a trapped signal ends `wait` early: wait on until the step itself has ended
    while kill -0 "$child" 2>/dev/null; do
        status=0
        wait "$child" || status=$?
    done
    child=""
    return "$status"
}
models_dir="${CTR_MODELS_DIR:-/models}"
name="${CTR_MODEL_NAME:-din}"
config="${CTR_INIT_CONFIG:-configs/synthetic_din.yaml}"

if [ "${CTR_INIT_FORCE_TRAIN:-0}" != "1" ] && ls "$models_dir/$name"/*/model.onnx >/dev/null 2>&1
then
    echo "init: a bundle exists under $models_dir/$name; not training"
else
    run_dir="$(mktemp -d)/run"
    set -- --config "$config" --out "$run_dir" --quiet
    for override in ${CTR_INIT_TRAIN_SET-train.epochs=2}; do
        set -- "$@" --set "$override"
    done
    echo "init: training $config -> $run_dir"
    run ctr train "$@"
    echo "init: exporting to $models_dir/$name"
    run ctr export --run "$run_dir" --models-dir "$models_dir" --name "$name"
    rm -rf "$run_dir"
fi

# the newest bundle's own config (its data options and L), which the api serves with
# CTR_MODEL_VERSION=latest: the same data it was trained on, overrides included
case "${CTR_INIT_LOAD:-1}" in
    1)
        echo "init: loading the data of $models_dir/$name's newest bundle into Redis" \
            "unless it holds it already"
        run ctr load --bundle "$models_dir/$name" --once
        ;;
    force)
        echo "init: loading the data of $models_dir/$name's newest bundle into Redis"
        run ctr load --bundle "$models_dir/$name"
        ;;
    0)
        echo "init: CTR_INIT_LOAD=0; not loading Redis"
        ;;
    *)
        echo "init: CTR_INIT_LOAD must be 1, force or 0, not '${CTR_INIT_LOAD}'" >&2
        exit 2
        ;;
esac
echo "init: done"

#!/bin/sh
# One-shot init job (docker compose service `init`, trainer image):
#   1. if the model store has no bundle for $CTR_MODEL_NAME, train a small model on the
#      synthetic data set and export it there;
#   2. bulk-load users, sequences and item features into Redis ($CTR_REDIS_URL), from the
#      data the newest bundle was trained on (its manifest's config).
# Settings (env): CTR_MODELS_DIR, CTR_MODEL_NAME, CTR_REDIS_URL,
#   CTR_INIT_CONFIG      feature config (default configs/synthetic_din.yaml)
#   CTR_INIT_TRAIN_SET   space-separated --set overrides (default "train.epochs=2")
#   CTR_INIT_FORCE_TRAIN 1 = train and export a new version even when one exists
#   CTR_INIT_LOAD        0 = skip the Redis bulk load (it runs on every `up` otherwise and
#                        resets user histories to the synthetic data set)
set -eu
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
    ctr train "$@"
    echo "init: exporting to $models_dir/$name"
    ctr export --run "$run_dir" --models-dir "$models_dir" --name "$name"
    rm -rf "$run_dir"
fi

if [ "${CTR_INIT_LOAD:-1}" = "1" ]; then
    # the newest bundle's own config (its data options and L), which the api serves with
    # CTR_MODEL_VERSION=latest: the same data it was trained on, overrides included
    echo "init: loading the data of $models_dir/$name's newest bundle into Redis"
    ctr load --bundle "$models_dir/$name"
else
    echo "init: CTR_INIT_LOAD=${CTR_INIT_LOAD}; not loading Redis"
fi
echo "init: done"

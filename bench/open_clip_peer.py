"""Run open_clip's own trainer (``open_clip_train.main``) on a model config file, for the side-by-side benchmark.

    PYTHONPATH=runs/bench/openclip-site .venv/bin/python bench/open_clip_peer.py \
        --model-config bench.json --threads 2 -- --model bench --train-data ... (open_clip_train's flags)

open_clip_train needs webdataset < 1.0, which bench/openclip_env.sh installs into
runs/bench/openclip-site; with that folder first on PYTHONPATH only this process sees it. The model
config is registered under its file stem, as open_clip's own configs are.
"""

import argparse
import sys

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", required=True, help="an open_clip model config JSON")
    parser.add_argument("--threads", type=int, required=True, help="torch intra-op threads")
    args, rest = parser.parse_known_args()
    import open_clip
    import webdataset
    from open_clip_train.main import main as open_clip_main

    if not webdataset.__version__.startswith("0."):
        sys.exit(f"open_clip_train needs webdataset < 1.0, found {webdataset.__version__}: run bench/openclip_env.sh "
                 "and put runs/bench/openclip-site first on PYTHONPATH")
    torch.set_num_threads(args.threads)
    open_clip.add_model_config(args.model_config)
    open_clip_main([a for a in rest if a != "--"])


if __name__ == "__main__":
    main()

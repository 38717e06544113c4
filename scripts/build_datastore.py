#!/usr/bin/env python
"""Build a kNN-LM datastore for a saved causal LM over its training files (lightarch.retrieval).

Keys are one decoder layer's hidden states (default: the input of the last layer's feed-forward, kNN-LM's best),
values the next tokens; the model runs over the training text in windows of --block_size tokens, keys stream to disk
as float16, then a faiss index is built. Writes --output_dir (default <model_dir>/datastore), replaced whole:

    keys.npy, values.npy        (N, d) float16 keys, (N,) int32 next tokens (numpy, no pickle)
    index.faiss                 faiss's own format (flat = exact, hnsw, ivf, or a factory string)
    datastore_config.json       layer, site, sizes, the corpus used
    manifest.json               sha256 of each file: a changed file is refused on load

    python scripts/build_datastore.py --model_dir outputs/sparse_moe
    python scripts/build_datastore.py --model_dir outputs/sparse_moe --index flat --output_dir outputs/datastore_flat
    python scripts/eval_retrieval.py --model_dir outputs/sparse_moe
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from transformers.hf_argparser import HfArgumentParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class BuildArguments:
    model_dir: str = field(default="outputs/sparse_moe", metadata={"help": "A saved causal LM (scripts/train.py)."})
    output_dir: str = field(default="", metadata={"help": "Where to write (new, empty, or an earlier output of this "
                                                          "script, which is replaced); empty = <model_dir>/datastore."})
    layer: int = field(default=-1, metadata={"help": "Decoder layer whose hidden states are the keys (-1 = last)."})
    site: str = field(default="ffn_input", metadata={"help": "ffn_input (the layer's feed-forward input, after its "
                                                             "norm) or layer_output."})
    index: str = field(default="hnsw", metadata={"help": "flat (exact), hnsw, ivf, or a faiss factory string."})
    ef_search: int = field(default=128, metadata={"help": "HNSW search breadth (recall vs speed)."})
    nprobe: int = field(default=16, metadata={"help": "IVF lists searched (recall vs speed)."})
    block_size: int = field(default=0, metadata={"help": "Tokens per window; 0 = the model's training block size "
                                                         "(results.json), else 256."})
    stride: int = field(default=0, metadata={"help": "Window step (< block_size: overlapping windows, longer "
                                                     "contexts); 0 = block_size."})
    batch_size: int = field(default=8, metadata={"help": "Windows per forward (the memory bound with the index)."})
    max_files: int = field(default=300, metadata={"help": "Training files read (the main job's split, in order)."})
    max_tokens: int = field(default=0, metadata={"help": "Cap on the tokens stored; 0 = all."})
    num_threads: int = field(default=0, metadata={"help": "torch threads; 0 = torch's default."})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring's layout kept, every default shown."""


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(BuildArguments, description=__doc__, formatter_class=HelpFormatter)
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                       look_for_args_file=False)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    import torch
    from lightarch.retrieval import DatastoreConfig
    from lightarch.retrieval.evaluation import build_folder_datastore

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    config = DatastoreConfig(layer=args.layer, site=args.site, index=args.index, block_size=args.block_size,
                             stride=args.stride, ef_search=args.ef_search, nprobe=args.nprobe)
    try:
        if args.batch_size < 1 or args.max_files < 1 or args.max_tokens < 0:
            raise ValueError("--batch_size and --max_files must be >= 1 and --max_tokens >= 0.")
        folder, datastore = build_folder_datastore(args.model_dir, args.output_dir or None, config, args.max_files,
                                                   args.max_tokens or None, args.batch_size)
    except ValueError as error:
        parser.error(str(error))
    print(f"{folder}: {len(datastore):,} keys of dim {datastore.keys.shape[1]} ({datastore.config.index} index); "
          f"from {datastore.config.source}")


if __name__ == "__main__":
    main()

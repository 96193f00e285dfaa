"""Command line: ``audioenc info`` and ``audioenc embed`` (also ``python -m audioenc``)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

DEFAULT_ARCHITECTURE = "wav2vec2-base"


def cmd_info(args) -> int:
    import platform

    import torch

    import audioenc
    from audioenc import _native
    from audioenc.backends import BACKENDS, availability
    from audioenc.presets import ARCHITECTURES

    print(f"audioenc {audioenc.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    if _native._C is None:
        print(f"native core: not built ({_native.import_error}); using the Python paths")
    else:
        print(f"native core: built (audioenc._C), CUDA kernels compiled: {'yes' if _native._C.cuda_compiled else 'no'}")
    cuda = torch.cuda.is_available()
    print(f"CUDA GPU: {torch.cuda.get_device_name(0) if cuda else 'none'}")
    for name in BACKENDS:
        reason = availability(name)
        print(f"backend {name:9s} {'available' if reason is None else reason}")
    print("families: wav2vec2, hubert, wavlm, whisper")
    print("random-weight architectures (random:NAME): " + ", ".join(ARCHITECTURES))
    return 0


def output_paths(inputs: list[str], out_dir: str, suffix: str) -> dict[str, str]:
    """Input file -> output file: files under a directory argument keep their relative path."""
    from audioenc.audio import find_audio_files

    mapping = {}
    for arg in inputs:
        root = arg if os.path.isdir(arg) else os.path.dirname(arg)
        for path in find_audio_files([arg]):
            rel = os.path.splitext(os.path.relpath(path, root))[0] + suffix
            target = os.path.join(out_dir, rel)
            if target in mapping.values():
                raise ValueError(f"two inputs would both write {target}; rename one or run them separately")
            mapping[path] = target
    return mapping


def atomic_write(path: str, write) -> None:
    """Writes through a temporary file in the same directory, then renames it into place."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def embed_one(enc, path: str, target: str, pool: str, layer: str) -> None:
    import numpy as np

    from audioenc.encoder import pool_frames

    all_layers = layer == "all"
    out = enc.encode(path, output_hidden_states=all_layers,
                     output_layer=None if all_layers or layer is None else int(layer))
    n = int(out.lengths[0])

    def reduce(x):
        x = x[:1].float()
        return (pool_frames(x, out.lengths, pool)[0] if pool != "none" else x[0, :n]).cpu().numpy()

    if all_layers:
        from safetensors.numpy import save_file

        tensors = {f"hidden_states.{i}": np.ascontiguousarray(reduce(h)) for i, h in enumerate(out.hidden_states)}
        tensors["last_hidden_state"] = np.ascontiguousarray(reduce(out.last_hidden_state))
        atomic_write(target, lambda tmp: save_file(tensors, tmp))
    else:
        array = reduce(out.last_hidden_state)
        atomic_write(target, lambda tmp: np.save(tmp, array))


def cmd_embed(args) -> int:
    from tqdm import tqdm

    import audioenc

    if args.layer not in (None, "all") and not args.layer.lstrip("-").isdigit():
        print(f"error: --layer must be a layer number or 'all', got {args.layer!r}", file=sys.stderr)
        return 2
    model = args.model or f"random:{DEFAULT_ARCHITECTURE}"
    try:
        enc = audioenc.load(model, backend=args.backend, device=args.device, dtype=args.dtype)
        jobs = output_paths(args.inputs, args.out, ".safetensors" if args.layer == "all" else ".npy")
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if enc.random_weights:
        print(f"NOTE: {'no --model given, so ' if args.model is None else ''}using the {model[len('random:'):]} "
              "architecture with RANDOM weights: the embeddings show the pipeline works but mean nothing. "
              "Pass --model with a checkpoint dir, .pt file or hub id for real embeddings.")
    print(enc)
    if not jobs:
        print("error: no audio files found in the given inputs", file=sys.stderr)
        return 2
    failed, skipped, written = [], [], 0
    for path, target in tqdm(jobs.items(), desc="embed", unit="file", file=sys.stderr):
        if os.path.exists(target) and not args.overwrite:
            skipped.append(target)
            continue
        try:
            embed_one(enc, path, target, args.pool, args.layer)
            written += 1
        except (ValueError, TypeError) as exc:
            failed.append(f"{path}: {exc}")
    print(f"wrote {written} file(s) to {args.out}")
    if skipped:
        print(f"skipped {len(skipped)} existing output(s) (use --overwrite to replace them)")
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audioenc", description="Fast inference for pre-trained audio encoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what is built and available here")
    info.set_defaults(func=cmd_info)
    embed = sub.add_parser("embed", help="embed audio files into .npy / .safetensors files")
    embed.add_argument("inputs", nargs="+", help="audio files or directories (searched recursively)")
    embed.add_argument("--model", help="checkpoint dir, .pt file, CTranslate2 dir, hub id or random:NAME "
                                       f"(default: random:{DEFAULT_ARCHITECTURE}, random weights)")
    embed.add_argument("--out", required=True, help="output directory (mirrors the input tree)")
    embed.add_argument("--pool", choices=["mean", "max", "none"], default="mean",
                       help="mean/max over frames -> (dim,), none -> (frames, dim)")
    embed.add_argument("--layer", default=None, help="layer number (0 = input of layer 1) or 'all' "
                                                     "(all hidden states into one .safetensors per file)")
    embed.add_argument("--backend", default="auto")
    embed.add_argument("--device", default="auto")
    embed.add_argument("--dtype", default="auto")
    embed.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    embed.set_defaults(func=cmd_embed)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

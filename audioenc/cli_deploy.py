"""``audioenc export`` and ``audioenc verify``: added to the main parser by :func:`register`."""
from __future__ import annotations

import argparse
import os
import sys

from audioenc.cli import TARGET_LANG_HELP


def model_of(source: str, target_lang: str | None = None):
    """The float32 reference model of ``source`` (a checkpoint or random:NAME) with ``target_lang``'s
    MMS adapter, on the CPU."""
    import audioenc

    return audioenc.load(source, backend="torch", device="cpu", dtype="float32", target_lang=target_lang).backend.model


def cmd_export(args) -> int:
    from audioenc.export import ExportSpec, export_to_dir

    try:
        if not args.out:
            raise ValueError("--out must name a directory, got ''")
        if args.format == "onnx" and (args.batch is not None or args.seconds is not None):
            raise ValueError("--batch and --seconds set a TensorRT profile; ONNX graphs take any batch and length")
        if args.format == "onnx":  # before the model loads; without the extra, export would end in a traceback
            from audioenc.backends.onnx import OnnxBackend

            unavailable = OnnxBackend.available()
            if unavailable is not None:
                raise ValueError(f"cannot export an ONNX graph here: {unavailable}")
        if args.format == "tensorrt":  # what can be told before the model loads
            from audioenc.backends.tensorrt import (DEFAULT_BATCH, DEFAULT_SECONDS, Profile, TensorRTBackend,
                                                    export_engine, parse_range)

            if args.dtype not in ("float32", "float16"):
                raise ValueError("TensorRT engines are built in float32 or float16")
            if args.fused_attention:
                raise ValueError("--fused-attention is for onnxruntime; TensorRT builds from the standard-op graph")
            batch = DEFAULT_BATCH if args.batch is None else parse_range(args.batch, "--batch", whole=True)
            seconds = DEFAULT_SECONDS if args.seconds is None else parse_range(args.seconds, "--seconds")
            unavailable = TensorRTBackend.available()
            if unavailable is not None:
                raise ValueError(f"cannot build a TensorRT engine here: {unavailable}")
        model = model_of(args.model, args.target_lang)
        num_layers = model.dims.num_layers if args.layers is None else args.layers
        if not 0 <= num_layers <= model.dims.num_layers:
            raise ValueError(f"--layer must be between 0 and {model.dims.num_layers} for this model, got {num_layers}")
        if args.format == "tensorrt" and args.seconds is not None and model.dims.family == "whisper":
            # not an engine for other lengths with no word said: Profile.from_ranges has none to set
            raise ValueError("--seconds sets the audio lengths of a wav2vec2-family engine; a Whisper engine always "
                             "takes 30 s windows of log-mel, so only --batch sets its profile")
        if args.format == "onnx":
            spec = ExportSpec(num_layers=num_layers, hidden_states=args.hidden_states, dtype=args.dtype,
                              fused_attention=args.fused_attention)
            written = export_to_dir(model, spec, args.out, overwrite=args.overwrite)
        else:
            written = export_engine(model, args.dtype, Profile.from_ranges(model.dims, batch, seconds), args.out,
                                    num_layers=num_layers, hidden_states=args.hidden_states, overwrite=args.overwrite)
    except (ValueError, TypeError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


def seed(text: str) -> int:
    """--seed's type: numpy's generators take whole numbers >= 0 only."""
    if not text.strip().isdecimal():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return int(text)


def cmd_verify(args) -> int:
    from audioenc.verify import verify

    audio = None
    if args.audio and args.seed is not None:
        print("error: --seed seeds generated audio; with --audio there is none", file=sys.stderr)
        return 2
    if args.audio:
        for path in args.audio:
            if not os.path.isfile(path):
                print(f"error: {path} is not a file", file=sys.stderr)
                return 2
        audio = list(args.audio)
    try:
        report = verify(args.model, args.backend, dtype=args.dtype, device=args.device, audio=audio, seed=args.seed,
                        target_lang=args.target_lang)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    return 0 if report.passed else 1


def register(subparsers) -> None:
    """Adds the ``export`` and ``verify`` subcommands to the main parser's subparsers."""
    export = subparsers.add_parser("export", help="export a model to ONNX or a TensorRT engine")
    export.add_argument("--model", required=True, help="checkpoint dir, .pt file, CTranslate2 dir, hub id or random:NAME")
    export.add_argument("--target-lang", help=TARGET_LANG_HELP)
    export.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx", help="(default onnx)")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--dtype", choices=["float32", "float16", "int8"], default="float32",
                        help="float16: MatMul/Conv in fp16, LayerNorm/softmax/residuals in fp32; int8: dynamic "
                             "quantisation (onnx only) (default float32)")
    export.add_argument("--layer", "--layers", dest="layers", metavar="N", type=int, default=None,
                        help="run only layers 1..N; the graph outputs layer N's output (default: all)")
    export.add_argument("--hidden-states", action="store_true", help="also output every layer's hidden state")
    export.add_argument("--fused-attention", action="store_true",
                        help="each attention as onnxruntime's MultiHeadAttention op (what backend='onnx' runs: "
                             "faster there, but the graph then runs only in onnxruntime)")
    export.add_argument("--batch", help="TensorRT profile: MIN:OPT:MAX batch size (default 1:1:8)")
    export.add_argument("--seconds", help="TensorRT profile: MIN:OPT:MAX audio seconds (default 1:10:47; "
                                          "wav2vec2 family; Whisper windows are 30 s)")
    export.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    export.set_defaults(func=cmd_export)

    verify = subparsers.add_parser("verify", help="check a backend against the torch reference, layer by layer")
    verify.add_argument("--model", required=True, help="checkpoint dir, .pt file, CTranslate2 dir, hub id or random:NAME")
    verify.add_argument("--target-lang", help=TARGET_LANG_HELP)
    verify.add_argument("--backend", required=True, help="onnx, tensorrt, triton, torch")
    verify.add_argument("--dtype", default="auto", help="the backend's dtype, checked against the float32 reference "
                        "(default auto: float32 on the CPU, float16 on a GPU)")
    verify.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    verify.add_argument("--audio", nargs="+", help="audio files (default: generated speech-like audio, fresh each run)")
    verify.add_argument("--seed", type=seed, default=None, help="seed for the generated audio (a whole number >= 0)")
    verify.set_defaults(func=cmd_verify)

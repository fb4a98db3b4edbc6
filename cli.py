"""The ``lowbit`` command line: compress, inspect, compare, passes, deploy, demo.

Exit status: 0 on success, 2 when the input is at fault (one sentence on stderr naming the file,
node or option; nothing is written), 1 on an internal error (a bug; the message names the pass).
Every command takes ``--json`` for machine-readable output on stdout.
"""

from __future__ import annotations

if __package__ in (None, ""):  # `python cli.py …` from a checkout: make `lowbit` this folder
    import importlib.util
    import pathlib
    import sys

    _root = pathlib.Path(__file__).resolve().parent
    _spec = importlib.util.spec_from_file_location("lowbit", _root / "__init__.py", submodule_search_locations=[str(_root)])
    _pkg = importlib.util.module_from_spec(_spec)
    sys.modules["lowbit"] = _pkg
    _spec.loader.exec_module(_pkg)

import argparse
import dataclasses
import json
import math
import os
import sys
import typing
import warnings
from pathlib import Path

from lowbit.analysis.report_format import human_bytes, human_count, jsonable
from lowbit.core.compile import _write_json_atomic, compress
from lowbit.core.errors import PassFailure, UserError

#: the pipeline ``demo`` runs: canonicalise, then W8A8 (int8 per-channel weights, uint8 activations)
#: that onnxruntime runs as QLinearConv
DEMO_PIPELINE = "fold-constants,fold-bn,cleanup,quantize(weights=8,granularity=channel,activations=8)"


def _out(args, text: str, data) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=_json_default))
    else:
        print(text)


def _json_default(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


# ---------------------------------------------------------------------------------------- compress


def _load_pipeline(args):
    from lowbit.passes.pipeline import load_recipe, parse_pipeline

    if bool(args.passes) == bool(args.recipe):
        raise UserError("give exactly one of --passes TEXT or --recipe FILE")
    return parse_pipeline(args.passes) if args.passes else load_recipe(args.recipe)


def _fmt_err(error):
    if not error:
        return "-", "-"
    sqnr = error.get("sqnr_db")
    sqnr = "exact" if sqnr in (math.inf, "inf") else f"{float(sqnr):.1f} dB"
    return f"{float(error['rel']):.2e}", sqnr


def summary_table(report: dict) -> str:
    from lowbit.analysis.report_format import format_table
    from lowbit.analysis.stats import macs_text

    info = report["info"]
    b, a = info["before"], info["after"]
    rows = []
    for p in report["passes"]:
        rel, sqnr = _fmt_err(p["error"])
        rows.append([p["name"], p["preserves"], "yes" if p["changed"] else "no", f"{p['seconds']:.2f}",
                     f"{p['verify_seconds']:.2f}", rel, sqnr])
    passes = format_table(rows, ["pass", "preserves", "changed", "time s", "verify s", "rel error", "SQNR"])
    sizes = format_table(
        [
            ["file size", human_bytes(b["file_bytes"]), human_bytes(a["file_bytes"]), _ratio(b["file_bytes"], a["file_bytes"])],
            ["parameters", human_count(b["params"]), human_count(a["params"]), _ratio(b["params"], a["params"])],
            ["MACs", macs_text(b), macs_text(a), _ratio(b["macs"], a["macs"])],
            ["nodes", str(b["nodes"]), str(a["nodes"]), _ratio(b["nodes"], a["nodes"])],
        ],
        ["", "before", "after", "ratio"],
    )
    total = report["passes"][-1]["total_error"] if report["passes"] else None
    rel, sqnr = _fmt_err(total)
    lines = [passes, "", sizes]
    at = ", ".join(f"{name} [{','.join(str(d) for d in shape)}]" for name, shape in b.get("input_shapes", {}).items())
    if at:
        assumed = b.get("assumed_dims") or {}
        guess = (f"; sizes assumed: {', '.join(f'{k}={v}' for k, v in assumed.items())} (pin them with --input-shape)"
                 if assumed else "")
        lines.append(f"MACs at {at}{guess}")
    target = next((p for p in report["passes"] if p["name"].startswith("target-ort ")), None)
    if target is not None:
        notes = target["notes"]
        done = "; ".join(f"{what} ×{n}" if n > 1 else what for what, n in notes["rewrites"].items()) or "nothing rewritten"
        lines.append(f"target onnxruntime {info['target_ort']}: {done}; result: ai.onnx opset {notes['opset']}, IR {notes['ir_version']}")
    lines += ["", f"output error vs input model: rel {rel}, SQNR {sqnr}"]
    for w in report["warnings"] + [w for p in report["passes"] for w in p["warnings"]]:
        lines.append(f"warning: {w}")
    lines.append(f"wrote {info['output']}")
    return "\n".join(lines)


def _ratio(before, after):
    return f"{before / after:.2f}x" if before and after else "-"


def cmd_compress(args) -> int:
    passes = _load_pipeline(args)
    report = compress(args.model, args.output, passes, calib=args.calib, seed=args.seed, verify=not args.no_verify,
                      external_data=True if args.external_data else None, report_path=args.report,
                      progress=not args.json and sys.stderr.isatty(), batch_size=args.batch_size,
                      input_shapes=args.input_shape, target_ort=args.target_ort)
    _out(args, summary_table(report), report)
    return 0


# ----------------------------------------------------------------------------------------- inspect


def cmd_inspect(args) -> int:
    from lowbit.analysis.stats import format_stats, model_stats
    from lowbit.core import io
    from lowbit.core.calib import apply_input_shapes

    model = io.load(args.model)
    pinned = apply_input_shapes(model, args.input_shape)
    stats = model_stats(model, batch=args.batch, path=args.model)
    data = jsonable(stats.to_dict())
    if pinned:
        data["pinned_input_shapes"] = pinned
    _out(args, format_stats(stats), data)
    return 0


# ----------------------------------------------------------------------------------------- compare


def cmd_compare(args) -> int:
    from lowbit.analysis.compare import compare_models, format_compare
    from lowbit.core import io
    from lowbit.core.calib import apply_input_shapes, input_specs, merge_specs, open_calibration, random_feed
    from lowbit.core.context import Context

    a, b = io.load(args.a), io.load(args.b)
    pinned = apply_input_shapes(a, args.input_shape)
    apply_input_shapes(b, args.input_shape)
    specs_a, specs_b = input_specs(a), input_specs(b)
    if [(s.name, s.dtype) for s in specs_a] != [(s.name, s.dtype) for s in specs_b]:
        raise UserError(f"{args.b}: its inputs differ from {args.a}'s, so outputs cannot be compared")
    specs = merge_specs(specs_a, specs_b, str(args.a), str(args.b))  # data both models accept
    if args.calib:
        calib = open_calibration(args.calib, a, batch_size=args.batch_size, seed=args.seed, specs=specs)
        feeds = list(_take(calib, args.max_batches))
    else:
        feeds = [random_feed(specs, args.batch_size, Context(seed=args.seed).rng("compare"))]
    try:
        result = compare_models(a, b, feeds, latency=not args.no_latency, threads=args.threads)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types
        _explain_run_failure(args, (a, b), specs, feeds, guessed=not args.calib or args.calib.startswith("random:"))
        raise exc
    result = {"a": str(args.a), "b": str(args.b), **result}
    if pinned:
        result["input_shapes"] = pinned
    _out(args, format_compare(result), jsonable(result))
    return 0


def _explain_run_failure(args, models, specs, feeds, *, guessed: bool) -> None:
    """After a failed comparison: if model A or B fails to run on a feed by itself, raise the
    UserError that says so (naming the input shapes, and --input-shape when they were guessed)."""
    from lowbit.core.calib import describe_feed
    from lowbit.runtime.session import session

    loose = [s for s in specs if any(not isinstance(d, int) for d in s.shape)]
    for label, path, model in (("A", args.a, models[0]), ("B", args.b, models[1])):
        try:
            sess = session(model, optimization="disable")
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{path}: model {label} does not load in onnxruntime ({_reason(exc)})") from None
        names = [o.name for o in sess.get_outputs()]
        for feed in feeds:
            try:
                sess.run(names, feed)
            except Exception as exc:  # noqa: BLE001
                shapes = describe_feed(specs, feed, guessed=guessed)
                if guessed and loose:
                    pins = " ".join(f"--input-shape {s.name}=" + ",".join(
                        str(d) if isinstance(d, int) else f"<{d or f'dim {i}'}>" for i, d in enumerate(s.shape))
                        for s in loose)
                    raise UserError(f"{path}: model {label} fails to run on random inputs of guessed size {shapes}; "
                                    f"give the sizes it accepts with {pins} ({_reason(exc)})") from None
                source = f"--calib {args.calib}" if args.calib else "random inputs"
                raise UserError(f"{path}: model {label} fails to run on {source}, {shapes} ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    from lowbit.passes.manager import ort_reason

    return ort_reason(exc)


def _take(iterable, n):
    for i, item in enumerate(iterable):
        if i >= n:
            break
        yield item


# ------------------------------------------------------------------------------------- sensitivity


def cmd_sensitivity(args) -> int:
    from lowbit.analysis.report_format import format_table
    from lowbit.analysis.sensitivity import plot, sensitivity
    from lowbit.core import io
    from lowbit.core.calib import open_calibration
    from lowbit.core.context import Context

    out = io.check_output_path(args.output, (args.model,))
    png = io.check_output_path(args.plot or out.with_suffix(".png"), (args.model,))
    try:
        bits = tuple(int(b) for b in args.bits.split(","))
    except ValueError:
        bits = ()
    if not bits or any(b not in (2, 3, 4, 8) for b in bits):
        raise UserError(f"--bits {args.bits}: give bit widths among 2,3,4,8 separated by commas")
    if args.block not in (16, 32, 64, 128, 256):
        raise UserError(f"--block {args.block}: must be 16, 32, 64, 128 or 256")
    model = io.load(args.model)
    calib = open_calibration(args.calib, model, batch_size=args.samples, seed=0)
    ctx = Context(progress=not args.json and sys.stderr.isatty())
    result = sensitivity(model, calib.first(args.samples), bits=bits, granularity=args.granularity, block=args.block,
                         symmetric=True, progress=ctx.track)
    result["model"] = str(args.model)
    _write_json_atomic(out, jsonable(result))
    plot(result, png, title=f"{Path(args.model).name}: output SQNR with one layer quantized")
    rows = [[layer["node"], layer["op"], human_count(layer["params"]),
             *(f"{layer['sqnr_db'][str(b)]:.1f}" for b in bits)] for layer in result["layers"]]
    text = format_table(rows, ["node", "op", "params", *(f"{b}-bit dB" for b in bits)])
    _out(args, f"{text}\nwrote {out} and {png}", jsonable(result))
    return 0


# ------------------------------------------------------------------------------------------ passes


def pass_catalogue() -> list[dict]:
    from lowbit.passes.base import _default_of, format_value, option_type_name, registry

    catalogue = []
    for name, cls in registry().items():
        hints = typing.get_type_hints(cls.Options)
        options = [
            {"name": f.name, "type": option_type_name(f, hints), "default": format_value(_default_of(f)),
             "doc": f.metadata.get("doc", "")}
            for f in dataclasses.fields(cls.Options)
        ]
        doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip()
        catalogue.append({"name": name, "preserves": cls.preserves, "summary": (cls.__doc__ or "").strip(),
                          "doc": doc, "options": options})
    return catalogue


def cmd_passes(args) -> int:
    catalogue = pass_catalogue()
    lines = []
    for entry in catalogue:
        lines.append(f"{entry['name']}  [{entry['preserves']}]  {entry['summary']}")
        for opt in entry["options"]:
            lines.append(f"    {opt['name']}: {opt['type']} = {opt['default']}    {opt['doc']}")
        if args.verbose:
            lines.extend("    | " + line for line in entry["doc"].splitlines())
        lines.append("")
    _out(args, "\n".join(lines).rstrip(), catalogue)
    return 0


# -------------------------------------------------------------------------------------------- demo


def cmd_deploy(args) -> int:
    from lowbit.runtime.deploy import deploy

    if args.inputs is not None and not args.check:
        raise UserError("--inputs is the data of --check; add --check")
    done = deploy(args.model, args.output, arch=args.target, check=args.check, inputs=args.inputs, seed=args.seed,
                  batch=args.batch_size)
    lines = [f"lowbit deploy: {args.model} for {done.arch} in {done.folder}", ""]
    rows = [[name, human_bytes(size)] for name, size in done.files.items()]
    rows.append(["total", human_bytes(sum(done.files.values()))])
    from lowbit.analysis.report_format import format_table

    lines.append(format_table(rows, ["file", "size"]))
    if not done.lowbit_ops:
        lines.append("the model uses none of lowbit's ops: liblowbit_ops.so is not needed")
    if done.check is not None:
        c = done.check
        how = "under qemu" if c["emulated"] else "natively"
        lines += ["", f"check ({how}, onnxruntime {c['onnxruntime']}): outputs within {c['max_rel_diff']:.1e} relative of "
                      f"this machine's run (tolerance {c['tolerance']:.0e}); latency median {c['latency_ms']['median']:.3f} ms"
                      + (" (emulated: not the device's speed)" if c["emulated"] else "")]
    lines += ["", f"on the device: cd {done.folder.name} && ./lowbit-run {Path(args.model).name} --input NAME=FILE.npy --output-dir out"]
    _out(args, "\n".join(lines), done.to_dict())
    return 0


def cmd_demo(args) -> int:
    from lowbit.models import demo

    result = demo.run(args.model, pipeline=args.passes or None, output=args.output,
                      progress=not args.json and sys.stderr.isatty())
    _out(args, demo.format_result(result), jsonable(result))
    return 0


# -------------------------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as lowbit user errors (exit 2, one sentence)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__

    parser = _Parser(prog="lowbit", description="lowbit: compress exported ONNX models for onnxruntime.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    shape_help = ("pin a model input's shape, e.g. images=1,3,320,320 (repeatable; ? keeps a dimension as the "
                  "model has it): its symbolic dims get these values when the model is loaded. Without it, "
                  "symbolic sizes are guessed: a batch of 1 to 16, 224 for an image's height and width, 16 "
                  "for other dims")
    parser.add_argument("--input-shape", action="append", dest="global_input_shape", metavar="NAME=D0,D1,…",
                        help=shape_help + " (for compress, inspect and compare)")
    shapes = _Parser(add_help=False)
    shapes.add_argument("--input-shape", action="append", dest="input_shape", default=[], metavar="NAME=D0,D1,…",
                        help=shape_help)

    p = sub.add_parser("compress", parents=[common, shapes], help="run a pipeline of passes on a model",
                       description="Load MODEL, run the passes with verification after each, write OUTPUT atomically.")
    p.add_argument("model", help="input .onnx file (never modified)")
    p.add_argument("-o", "--output", required=True, help="output .onnx file (not the input; its folder must exist)")
    p.add_argument("--passes", help="pipeline text, e.g. 'fold-bn,cleanup' (see 'lowbit passes')")
    p.add_argument("--recipe", help="TOML recipe file with the same content as --passes")
    p.add_argument("--calib", help="calibration data: FILE.npz, a folder of .npz, random:N, or module:function")
    p.add_argument("--batch-size", type=int, default=16, help="calibration batch size in samples (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    p.add_argument("--report", help="write the full report as JSON to this file")
    p.add_argument("--no-verify", action="store_true", help="skip the numeric output comparison after each pass")
    p.add_argument("--external-data", action="store_true", help="store tensors in OUTPUT.data (automatic above 2 GB)")
    p.add_argument("--target-ort", metavar="X.Y[:stock]",
                   help="emit only what this onnxruntime version (1.17 … 1.31) loads; ':stock' also forbids lowbit's own ops")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("inspect", parents=[common, shapes], help="opsets, op histogram, parameters, MACs, quantization status",
                       description="Describe MODEL: opset/IR, ops, parameters and bytes by dtype, MACs, largest layers.")
    p.add_argument("model", help=".onnx file")
    p.add_argument("--batch", type=int, default=1, help="batch size assumed for symbolic batch dimensions (default 1)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("compare", parents=[common, shapes], help="output error and latency of two models",
                       description="Run A and B on the same inputs: output error (max abs, relative, SQNR, cosine, "
                                   "top-1 agreement) and onnxruntime latency measured in the same run.")
    p.add_argument("a", help="reference .onnx")
    p.add_argument("b", help="candidate .onnx")
    p.add_argument("--calib", help="inputs: FILE.npz, folder, random:N or module:function (default: random)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per run (default 16)")
    p.add_argument("--max-batches", type=int, default=8, help="compare on at most this many batches (default 8)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: onnxruntime's)")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs (default 0)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sensitivity", parents=[common], help="per-layer quantization sensitivity (JSON + PNG)",
                       description="For each quantizable layer and bit width, the model-output SQNR when that layer "
                                   "alone is quantized (RTN); writes JSON and a PNG chart. quantize(weights=auto) "
                                   "uses the same measurement to choose bits per layer.")
    p.add_argument("model", help=".onnx file")
    p.add_argument("--calib", required=True, help="calibration data: FILE.npz, folder, random:N or module:function")
    p.add_argument("-o", "--output", required=True, help="JSON file to write")
    p.add_argument("--plot", help="PNG chart to write (default: the JSON path with .png)")
    p.add_argument("--bits", default="2,3,4,8", help="candidate bit widths, comma separated (default 2,3,4,8)")
    p.add_argument("--granularity", default="block", choices=["block", "channel", "tensor"], help="scale sharing (default block)")
    p.add_argument("--block", type=int, default=32, help="block size along the reduction axis (default 32)")
    p.add_argument("--samples", type=int, default=32, help="calibration samples measured (default 32)")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("passes", parents=[common], help="list every pass with its options",
                       description="Every pass: name, what it preserves, options with types, defaults and units.")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each pass's full documentation")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("deploy", parents=[common], help="build the folder to copy to a device (x86_64 or aarch64)",
                       description="Write OUTPUT with MODEL, lowbit-run (the C++ host), onnxruntime and lowbit's op library "
                                   "for the target CPU, cross-compiled for aarch64; --check runs it (under qemu for "
                                   "aarch64) and compares its outputs with this machine's run.")
    p.add_argument("model", help=".onnx file (copied as is; it must load in onnxruntime 1.21 — see --target-ort)")
    p.add_argument("-o", "--output", required=True, help="folder to write (must not exist, or be empty)")
    p.add_argument("--target", default="x86_64", help="device CPU: x86_64 (default) or aarch64")
    p.add_argument("--check", action="store_true", help="run the folder's host on seeded inputs and compare outputs")
    p.add_argument("--inputs", help="the check's inputs: FILE.npz, a folder of .npz or module:function (as --calib; "
                                    "default: seeded random data)")
    p.add_argument("--batch-size", type=int, default=1, help="samples the check runs at once (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for the check's random inputs (default 0)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("demo", parents=[common], help="compress the embedded digits CNN and show before/after",
                       description="Compress an embedded model with the default pipeline and print accuracy, size "
                                   "and latency before and after.")
    p.add_argument("--model", default="digits", choices=["digits", "llama"], help="embedded model (default digits)")
    p.add_argument("--passes", help=f"pipeline to run instead of the default ({DEMO_PIPELINE})")
    p.add_argument("-o", "--output", help="keep the compressed model here (default: a temporary folder)")
    p.set_defaults(func=cmd_demo)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"lowbit: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.showwarning = _show_warning
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        if args.global_input_shape:
            if not hasattr(args, "input_shape"):
                raise UserError(f"--input-shape applies to compress, inspect and compare, not {args.command}")
            args.input_shape = args.global_input_shape + args.input_shape
        return args.func(args)
    except UserError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    except PassFailure as exc:
        print(f"lowbit: internal error in {exc}", file=sys.stderr)
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        return 1
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - report any bug as exit 1 with its type
        print(f"lowbit: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The ``bnfx`` command: ``demo``, ``inspect`` and ``export``.

    bnfx demo [--model resnet18] [--steps 4] [--sync --nproc 2]
    bnfx inspect resnet50 --ghost-batch-size 16
    bnfx inspect model.pt2
    bnfx inspect resnet18 --eval --fold
    bnfx export resnet18 -o resnet18_ghost.pt2 --ghost-batch-size 16 --input-shape 32,3,224,224
    bnfx export resnet18 -o resnet18_folded.pt2 --eval --fold --input-shape 1,3,224,224

A bad argument prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys

import torch
from torch.fx.proxy import TraceError

from bnfx.messages import first_line
from bnfx.model_loading import UsageError, load_model


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError("bnfx: a command is required: demo, inspect or export (bnfx --help)")
        args.run(args)
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    return 0


_MODEL_HELP = (
    "a torchvision classification model name (resnet18, resnet50, mobilenet_v3_small, ...) or "
    "package.module:factory, a function of that module returning an nn.Module (the current "
    "directory is importable)"
)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bnfx", description="Ghost and synchronized batch norm as graph passes.")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    demo = commands.add_parser("demo", help="train a torchvision model a few steps through torch.compile")
    demo.add_argument("--model", default="resnet18", help=_MODEL_HELP + " (default resnet18)")
    demo.add_argument("--steps", type=_positive, default=4, help="training steps (default 4)")
    demo.add_argument("--batch", type=_positive, default=48, help="samples per step and process (default 48)")
    demo.add_argument("--image-size", type=_positive, default=64, help="input height and width (default 64)")
    demo.add_argument("--ghost-batch-size", type=_positive, default=16, help="ghost mode's sub-batch (default 16)")
    demo.add_argument("--sync", action="store_true", help="sync mode over --nproc gloo processes instead")
    demo.add_argument("--nproc", type=_positive, default=2, help="processes for --sync (default 2)")
    demo.add_argument(
        "--inner", default="aot_eager", choices=["aot_eager", "inductor", "eager"],
        help="compiler after the passes (default aot_eager; inductor compiles for minutes on small CPUs)",
    )
    demo.set_defaults(run=_run_demo)

    inspect = commands.add_parser("inspect", help="the bnfx.explain table of a model or a .pt2 program")
    inspect.add_argument("model", help=_MODEL_HELP + ", or an exported FILE.pt2")
    _add_options(inspect)
    inspect.add_argument("--eval", action="store_true", help="inspect the model in eval mode")
    inspect.add_argument("--fold", action="store_true", help="what bnfx.fold does to each site (bnfx.explain_fold)")
    inspect.set_defaults(run=_run_inspect)

    export = commands.add_parser("export", help="torch.export a model, rewrite it, save it as .pt2")
    export.add_argument("model", help=_MODEL_HELP)
    export.add_argument("-o", "--output", required=True, help="the .pt2 file to write")
    _add_options(export)
    export.add_argument(
        "--input-shape", type=_shape, default=(32, 3, 224, 224), help="example input N,C,H,W (default 32,3,224,224)"
    )
    export.add_argument("--decomposed", action="store_true", help="save the decomposed IR (run_decompositions)")
    export.add_argument("--eval", action="store_true", help="export the model in eval mode")
    export.add_argument(
        "--fold", action="store_true",
        help="with --eval: fold batch norm into the convolution or linear layer before it (bnfx.fold) "
        "instead of rewriting it",
    )
    export.set_defaults(run=_run_export)
    return parser


def _add_options(parser: argparse.ArgumentParser) -> None:
    """The bnfx options, as in Python: ghost_batch_size, sync, group_size, freeze."""
    parser.add_argument("--ghost-batch-size", type=_positive, help="ghost mode with this sub-batch size")
    parser.add_argument("--sync", action="store_true", help="sync mode (over WORLD)")
    parser.add_argument("--group-size", type=_positive, help="sync mode within blocks of this many ranks")
    parser.add_argument("--freeze", action="store_true", help="sync mode, running statistics only")


def _check_fold_arguments(args) -> None:
    if not args.fold:
        return
    if not args.eval and not args.model.endswith(".pt2"):
        raise UsageError("bnfx: --fold needs --eval: folding bakes the running statistics into the weights")
    given = _given_options(args)
    if given:
        raise UsageError(f"bnfx: --fold folds eval batch norm; {given} does not apply to it")


def _given_options(args) -> str:
    """The bnfx options on the command line, as typed (``--ghost-batch-size 16 --sync``)."""
    given = [f"--ghost-batch-size {args.ghost_batch_size}" if args.ghost_batch_size else "",
             f"--group-size {args.group_size}" if args.group_size else "",
             "--sync" if args.sync else "", "--freeze" if args.freeze else ""]
    return " ".join(flag for flag in given if flag)


def _options(args) -> dict:
    options = {"ghost_batch_size": args.ghost_batch_size, "group_size": args.group_size}
    options = {key: value for key, value in options.items() if value is not None}
    if args.sync:
        options["sync"] = True
    if args.freeze:
        options["freeze"] = True
    try:
        from bnfx.options import resolve_options

        resolve_options(options)
    except (TypeError, ValueError) as error:
        raise UsageError(f"bnfx: {error}") from None
    return options


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 32,3,224,224, got {text!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected at least N,C, all positive, got {text!r}")
    return shape


def _run_inspect(args) -> None:
    import bnfx

    _check_fold_arguments(args)
    options = {} if args.fold else _options(args)
    if args.model.endswith(".pt2"):
        model = _load_program(args.model)
    else:
        model = load_model(args.model).train(not args.eval)
    try:
        print(bnfx.explain_fold(model) if args.fold else bnfx.explain(model, **options))
    except TraceError as error:
        raise UsageError(f"bnfx: {error}") from None


def _load_program(path: str):
    if not os.path.isfile(path):
        raise UsageError(f"bnfx: no such file: {path!r}")
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)  # torch logs the traceback of a failed load as a warning
    try:
        return torch.export.load(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a bad argument here
        raise UsageError(f"bnfx: cannot load {path!r}: {first_line(error)}") from None
    finally:
        export_log.setLevel(level)


def _run_export(args) -> None:
    from bnfx.fold import folded_copy
    from bnfx.transform import _rewritten_copy

    _check_fold_arguments(args)
    options = {} if args.fold else _options(args)
    _check_output_path(args.output)
    model = load_model(args.model).train(not args.eval)
    _check_input_shape(model, args)
    try:
        program = torch.export.export(model, (torch.randn(args.input_shape),))
    except Exception as error:  # noqa: BLE001 - the exporter's traceback is hundreds of lines
        raise UsageError(f"bnfx: torch.export cannot export {args.model}: {first_line(error)}") from None
    if args.decomposed:
        program = program.run_decompositions()
    if args.fold:
        rewritten, report = folded_copy(program)
        report.warn_plain_sites()
        loading = "torch.export.load reads it without bnfx"
    else:
        rewritten, report = _rewritten_copy(program, options)  # one rewrite: the program and its table
        loading = "load it after `import bnfx`"
    torch.export.save(rewritten, args.output)
    print(report)
    print(f"saved {args.output} ({loading})")


def _check_output_path(path: str) -> None:
    if not path.endswith(".pt2"):
        stem = os.path.splitext(os.path.basename(path))[0] or "model"
        raise UsageError(f"bnfx: -o {path}: export writes a torch.export program; give a .pt2 file, e.g. {stem}.pt2")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"bnfx: -o {path}: no such folder: {folder}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"bnfx: -o {path}: folder {folder} is not writable")
    if os.path.isdir(path):
        raise UsageError(f"bnfx: -o {path} is a folder; give a file name, e.g. {os.path.join(path, 'model.pt2')}")


def _check_input_shape(model: torch.nn.Module, args) -> None:
    """Run a copy of the model on meta tensors (no arithmetic) to check ``--input-shape``."""
    shape = ",".join(map(str, args.input_shape))
    if args.input_shape[0] == 1 and not args.eval and _has_batch_norm(model):
        raise UsageError(
            f"bnfx: --input-shape {shape}: a training-mode export needs a batch of 2 samples or more "
            "(batch norm refuses to normalize a single sample); give N >= 2, or --eval"
        )
    dims = _input_dims(model)
    if dims is not None and len(args.input_shape) != dims:
        names = {3: "N,C,L", 4: "N,C,H,W", 5: "N,C,D,H,W"}.get(dims, f"{dims} sizes")
        raise UsageError(
            f"bnfx: --input-shape {shape}: {args.model} needs {dims} dimensions ({names}), got {len(args.input_shape)}"
        )
    if _fails(copy.deepcopy(model).to("meta"), torch.empty(args.input_shape, device="meta")):
        # meta kernels say less ("Invalid channel dimensions"): torch's message from a real run,
        # which stops at the first layer that does not fit
        error = _fails(copy.deepcopy(model), torch.zeros(args.input_shape)) or "the model refuses that shape"
        raise UsageError(f"bnfx: --input-shape {shape} does not fit {args.model}: {error}")


def _input_dims(model: torch.nn.Module) -> int | None:
    """The dimensions a batch of the model's input has, read off its first convolution (its
    weight has one per spatial dimension, beside out and in channels); None where it has none."""
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    return None if conv is None else conv.weight.dim()


def _fails(model: torch.nn.Module, x: torch.Tensor) -> str | None:
    """The first line of the error ``model(x)`` raises, or None."""
    try:
        with torch.no_grad():
            model(x)
    except Exception as error:  # noqa: BLE001 - any failure means the shape does not fit
        return first_line(error)
    return None


def _has_batch_norm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _run_demo(args) -> None:
    from bnfx import demo

    if args.sync:
        demo.run_sync(args)
    else:
        demo.run_ghost(args)


if __name__ == "__main__":
    sys.exit(main())

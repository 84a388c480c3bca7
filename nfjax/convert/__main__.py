"""``python -m nfjax.convert``: import published weights, export trained ones.

    python -m nfjax.convert deepmind F0_haiku.npz --model nfnet_f0 --out weights/nfnet_f0
    python -m nfjax.convert timm model.safetensors --model eca_nfnet_l0 --out weights/eca_nfnet_l0
    python -m nfjax.convert export-timm RUN_DIR --out model.safetensors

The output folder of an import is read by ``nfjax.evaluate --workdir``, ``nfjax.predict --workdir``,
``--config.model.init_from`` and ``create_model(name, pretrained=DIR)``. See docs/pretrained.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from nfjax.cli import run_parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nfjax.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for kind, example in (("deepmind", "nfnet_f0 (F0_haiku.npz) .. nfnet_f6"), ("timm", "dm_nfnet_f0, eca_nfnet_l0")):
        p = sub.add_parser(kind, help=f"convert a {kind} checkpoint into an nfjax weights folder")
        p.add_argument("file", help="the checkpoint file")
        p.add_argument("--model", required=True, help=f"the model the file holds, e.g. {example}")
        p.add_argument("--out", required=True, help="a new folder for the converted weights")
        p.add_argument("--class-names", default=None, help="a text file with one class name per line")
        p.add_argument(
            "--model-kwargs",
            default=None,
            help="JSON constructor overrides for a file of a non-standard size, e.g. '{\"depths\": [1, 1, 1, 1]}'",
        )
    p = sub.add_parser("export-timm", help="write a run's weights as a timm state dict (.safetensors)")
    p.add_argument("run_dir", help="a training --workdir or a converted weights folder")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--weights", default="auto", help="params, ema, or auto (EMA when the run keeps one)")
    return parser


def run(args: argparse.Namespace) -> dict:
    from nfjax.convert import api
    from nfjax.convert.errors import ConversionError

    try:
        if args.command in ("deepmind", "timm"):
            kwargs = _json_object(args.model_kwargs)
            convert = api.convert_deepmind if args.command == "deepmind" else api.convert_timm
            record = convert(args.file, args.model, args.out, args.class_names, kwargs)
        else:
            name = api.export_timm(args.run_dir, args.out, args.weights)
            return dict(wrote=args.out, timm_model=name, load_with=f"timm.create_model('{name}', checkpoint_path=...)")
    except IsADirectoryError as e:
        raise ConversionError(f"{e.filename} is a folder; give the checkpoint file") from None
    except PermissionError as e:
        raise ConversionError(f"cannot read or write {e.filename}: permission denied") from None
    return dict(
        wrote=args.out, model=record["model"], model_kwargs=record["model_kwargs"], classes=record["num_classes"]
    )


def _json_object(text: str | None) -> dict | None:
    from nfjax.convert.errors import ConversionError

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConversionError(f"--model-kwargs is not JSON ({e}); e.g. '{{\"depths\": [1, 1, 1, 1]}}'") from None
    if not isinstance(value, dict):
        raise ConversionError("--model-kwargs must be a JSON object of constructor arguments")
    return value


def main(argv: list[str] | None = None) -> int:
    code, result = run_parsed(build_parser(), argv, run)
    if code == 0 and result is not None:  # not after --help
        print(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())

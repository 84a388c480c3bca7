"""``python -m nfjax.models --model nfnet_f0 --image-size 256``: parameters and compute of a model.

``--list`` prints every model name. Nothing is allocated: the model is built abstractly.
"""

from __future__ import annotations

import argparse
import json
import sys

from nfjax.models import list_models, model_metadata
from nfjax.models.summary import abstract_model, count_macs, count_params, xla_flops_per_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nfjax.models", description=__doc__)
    parser.add_argument("--model", default="nfnet_f0", help="model name (see --list)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's test resolution")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--list", action="store_true", help="list the model names and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(list_models()))
        return 0
    try:
        meta = model_metadata(args.model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = args.image_size or meta["test_size"]
    model = abstract_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels)
    report = {
        "model": args.model,
        "image_size": size,
        "params": count_params(model),
        "macs": count_macs(model, size, args.in_channels),
        "xla_flops_per_image": xla_flops_per_image(model, size, args.in_channels),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"model           {report['model']} at {size}x{size}")
        print(f"parameters      {report['params']:,}")
        print(f"MACs (conv+dot) {report['macs'] / 1e9:.3f} G  (every kernel tap; the papers' convention)")
        print(f"XLA flops/image {report['xla_flops_per_image'] / 1e9:.3f} G  (XLA cost analysis; skips padding)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

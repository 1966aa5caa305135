"""`python -m dymu_lightning COMMAND`. See README.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dymu_lightning")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="DToMe on the real DINOv2-S over real photos; prints token counts")
    demo.add_argument("--r", type=int, default=12, help="target merges per layer for the thresholds")
    demo.add_argument("--images", type=Path, default=None, help="a folder of images (default: bundled photos)")
    commands.add_parser("ls", help="list the registered backbones")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from dymu_lightning import demo as demo_module

        demo_module.main(r=args.r, image_dir=args.images)
    elif args.command == "ls":
        from dymu_lightning.backbones import list_backbones

        print("backbones:")
        for name in list_backbones():
            print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``rclip`` command group. Subcommands live one per module in ``rclip_cli/commands`` and
are imported only when used, so ``rclip --help`` and each command start fast."""

from __future__ import annotations

import importlib

import click

from rclip_cli._common import RclipGroup
from rclip_core import __version__

# command name -> (module under rclip_cli.commands, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "quickstart": ("quickstart", "quickstart", "Run the whole method offline on ShapesWorld and write a report."),
    "detect": ("detect", "detect", "Detect any classes in images (open vocabulary)."),
    "eval": ("eval", "eval_cmd", "COCO / LVIS evaluation: zero-shot (GT or RPN boxes) or a detector."),
    "finetune": ("finetune", "finetune", "Fine-tune an open-vocabulary detector (COCO, LVIS, your data)."),
    "pretrain": ("pretrain", "pretrain", "Region-text pretraining (or image-text CLIP training) from a recipe."),
    "concepts": ("concepts", "concepts", "Extract a concept pool (nouns) from caption data."),
    "embed": ("embed", "embed", "Embed class / concept names with prompt templates."),
    "pseudo-label": ("pseudo_label", "pseudo_label", "Label image regions with a teacher and a concept pool."),
    "data": ("data", "data", "Make and inspect data sets (ShapesWorld)."),
    "weights": ("weights", "weights", "Inspect, convert and download model weights."),
    "export": ("export", "export", "Export a detector to ONNX (vocabulary as an input)."),
}


class LazyGroup(RclipGroup):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [n for n, (mod, _, _) in COMMANDS.items() if importlib.util.find_spec(f"rclip_cli.commands.{mod}")]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        mod, attr, _ = COMMANDS[name]
        try:
            module = importlib.import_module(f"rclip_cli.commands.{mod}")
        except ModuleNotFoundError as e:
            if e.name == f"rclip_cli.commands.{mod}":
                return None
            raise
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, COMMANDS[n][2]) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rclip")
def cli() -> None:
    """rclip: open-vocabulary object detection with RegionCLIP.

    \b
    Examples:
      rclip quickstart                                  # the whole method offline, on ShapesWorld
      rclip detect img.jpg --classes "kite,boy" --weights regionclip_pretrained-cc_rn50.pth
      rclip eval --zero-shot --boxes gt --dataset coco-ovd --images val2017/ --weights W.pth
      rclip pretrain recipes/shapes_regionclip.yaml --nproc 2

    Add --debug to any command to see full tracebacks.
    """


def main() -> None:
    cli(prog_name="rclip")


if __name__ == "__main__":
    main()

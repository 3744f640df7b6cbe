"""The ``kdedge`` command line. Each command builds a config and calls one library function."""

from __future__ import annotations

import sys
import typing
from dataclasses import MISSING, fields
from typing import Any

import click

from kdedge.config import DistillConfig, TrainConfig, _allowed_types, _RunConfig, load_config
from kdedge.errors import KdedgeError

_HELP = {
    "data": "Built-in dataset (fashion-mnist, mnist), a directory of IDX files, or an .npz file.",
    "train_limit": "Use only the first N training samples.",
    "test_limit": "Use only the first N test samples.",
    "epochs": "Number of training epochs.",
    "batch_size": "Mini-batch size.",
    "optimizer": "sgd (Nesterov momentum) or adamw.",
    "lr": "Peak learning rate.",
    "momentum": "SGD momentum.",
    "weight_decay": "Weight decay (not applied to biases and norm parameters).",
    "schedule": "Learning-rate schedule: cosine or constant.",
    "warmup_epochs": "Linear warm-up length in epochs.",
    "label_smoothing": "Label smoothing of the cross-entropy term.",
    "augment": "Random crop and horizontal flip (the teacher then runs per batch; no logit cache).",
    "random_erasing": "Probability of random erasing when --augment is on.",
    "seed": "Seed for initialization, shuffling and augmentation.",
    "device": "auto, cpu or cuda.",
    "precision": "fp32, or bf16 autocast.",
    "channels_last": "Channels-last memory format (measured faster for the zoo CNNs on x86 CPUs).",
    "threads": "torch intra-op threads (default: torch's choice).",
    "out": "Run directory to create (default runs/<command>-<time>); must not exist.",
    "model": "Zoo model to train, NAME or NAME@WIDTH (resnet, tiny_cnn, dw_cnn, mlp).",
    "teacher": "Shipped zoo teacher name, a run directory or a .safetensors checkpoint.",
    "student": "Zoo student NAME or NAME@WIDTH, or a checkpoint to fine-tune.",
    "alpha": "Weight of the distillation term in [0, 1]; 0 is plain supervised training.",
    "temperature": "Softmax temperature T of the distillation term.",
    "cache": "Teacher-logit cache: disk (~/.cache/kdedge/logits), memory or off.",
}


def _options_from(cls: type[_RunConfig]):
    """One click option per config field; defaults stay in the dataclass, not in click."""

    hints = typing.get_type_hints(cls)

    def decorate(func):
        for f in reversed(fields(cls)):
            flag = "--" + f.name.replace("_", "-")
            types_ = [t for t in _allowed_types(hints[f.name]) if t is not type(None)]
            default = f.default if f.default is not MISSING else None
            show = f" [default: {default}]" if default not in (None, "") else ""
            if types_ == [bool]:
                func = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=_HELP.get(f.name, "") + show)(func)
            else:
                func = click.option(flag, f.name, type=types_[0], default=None, help=_HELP.get(f.name, "") + show)(func)
        return func

    return decorate


def _config(cls: type[_RunConfig], config_file: str | None, params: dict[str, Any]) -> Any:
    ctx = click.get_current_context()
    explicit = {k: v for k, v in params.items() if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    return load_config(cls, config_file, explicit)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdedge-distill", prog_name="kdedge")
def cli() -> None:
    """Distill a large teacher into a small student and ship it to the edge."""


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file whose keys mirror these flags; flags win.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_options_from(TrainConfig)
def train(config_file: str | None, quiet: bool, **params: Any) -> None:
    """Supervised training of a zoo model (how teachers are trained)."""
    from kdedge.runs import run_train

    result = run_train(_config(TrainConfig, config_file, params), progress=not quiet)
    _summary(result)


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file whose keys mirror these flags; flags win.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_options_from(DistillConfig)
def distill(config_file: str | None, quiet: bool, **params: Any) -> None:
    """Distill a teacher into a student with Hinton's loss.

    With no arguments: the shipped Fashion-MNIST teacher into tiny_cnn.
    """
    from kdedge.runs import run_distill

    result = run_distill(_config(DistillConfig, config_file, params), progress=not quiet)
    _summary(result)


@cli.command()
@click.argument("name", default="fashion-mnist")
def data(name: str) -> None:
    """Find built-in dataset NAME locally (or download it) and print its directory.

    Looks in $KDEDGE_DATA/NAME, ~/.cache/kdedge/NAME and /usr/share/datasets/NAME, then
    downloads the official files into ~/.cache/kdedge/NAME, checking their sha256.
    """
    from kdedge.data import locate_dataset

    click.echo(str(locate_dataset(name)))


def _summary(result: Any) -> None:
    m = result.metrics
    line = f"{m['model']['name']}: test accuracy {m['test']['accuracy']:.4f}, macro F1 {m['test']['macro_f1']:.4f}, {m['model']['params']:,} params"
    if "teacher" in m and m["teacher"].get("test"):
        t = m["teacher"]
        line += f" | teacher accuracy {t['test']['accuracy']:.4f}, {t['params']:,} params"
    click.echo(line)
    click.echo(f"wrote {result.out}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input becomes one line on stderr and exit code 2, never a traceback."""
    try:
        cli.main(args=argv, prog_name="kdedge", standalone_mode=False)
    except KdedgeError as exc:
        click.echo(f"kdedge: error: {exc}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("kdedge: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"kdedge: error: {exc.format_message()} (see kdedge --help)", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("kdedge: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

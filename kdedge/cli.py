"""The ``kdedge`` command line. Each command builds a config and calls one library function."""

from __future__ import annotations

import os
import sys
import traceback
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import click

from kdedge.config import CompressConfig, DistillConfig, PruneConfig, QATConfig, SearchConfig, TrainConfig, _allowed_types, _element_type, _RunConfig, load_config
from kdedge.errors import ConfigError, KdedgeError

_HELP = {
    "data": "Built-in dataset (fashion-mnist, mnist, cifar10), an image folder (DIR/train/<class>/*.jpg with DIR/test/ or DIR/val/), a directory of IDX or .npy files, or an .npz file.",
    "train_limit": "Use only N training samples: a seeded subset with every class in its share.",
    "test_limit": "Use only N test samples: a seeded subset with every class in its share.",
    "epochs": "Number of training epochs.",
    "batch_size": "Mini-batch size.",
    "optimizer": "sgd (Nesterov momentum) or adamw.",
    "lr": "Peak learning rate.",
    "momentum": "SGD momentum.",
    "weight_decay": "Weight decay (not applied to biases and norm parameters).",
    "schedule": "Learning-rate schedule: cosine or constant.",
    "warmup_epochs": "Linear warm-up length in epochs.",
    "label_smoothing": "Label smoothing of the cross-entropy term.",
    "augment": "Random crop and horizontal flip (the teacher then runs per batch unless --views caches its outputs).",
    "views": "Augmented distillation from K cached views per training image: the teacher scores K crops/flips (and --random-erasing boxes) of every image once, and each epoch the student trains on one of them, exactly as the teacher saw it. Implies --augment. 0: no stored views.",
    "view_topk": "With --views: store the teacher's top-k log-probabilities per view instead of all classes (for many classes, e.g. 10 of 1000).",
    "teacher_runtime": "Where the teacher's cache passes (logits, views) run: auto takes onnxruntime when it matches torch to 1e-4 on a probe batch and is faster, else torch.",
    "val_split": "Hold out this fraction of the training images (fixed seed) for validation: per-epoch accuracy and the gates use it; the test split is read for the final report only. An image folder's val/ next to test/ is used without it.",
    "image_size": "Image folders: resize the shorter side to N (bilinear) and center-crop N×N; needed when the images' sizes differ.",
    "layout": "Arrays: NCHW or NHWC, for a shape that could be either (e.g. (N, 3, 32, 3)).",
    "decode_cache": "Image folders: decode every image once into the cache (~/.cache/kdedge/decoded, C·H·W bytes per image) so epochs read pixels instead of decoding files; skipped when it would fill over half the free disk.",
    "workers": "Image folders: DataLoader worker processes decoding images [default: one per core, at most 8; 0 decodes in the training process].",
    "random_erasing": "Probability of random erasing when --augment or --views is on.",
    "seed": "Seed for initialization, shuffling and augmentation.",
    "device": "auto, cpu or cuda.",
    "precision": "fp32, bf16 autocast (CPU or CUDA), or fp16 autocast with a gradient scaler (CUDA).",
    "channels_last": "Channels-last memory format (measured faster for the zoo CNNs on x86 CPUs).",
    "threads": "torch intra-op threads (default: torch's choice).",
    "out": "Run directory to create (default runs/<command>-<time>); must not exist. Per-epoch checkpoints go to OUT.partial/.",
    "sanity_checks": "Stop early with the likely cause when the teacher scores near chance before training, or training diverges (non-finite loss, accuracy at chance).",
    "resume": "Continue a killed run from OUT.partial/checkpoint.pt (same --out and settings).",
    "model": "Zoo model to train, NAME or NAME@WIDTH (resnet, tiny_cnn, dw_cnn, mlp), or package.module:factory / file.py:factory.",
    "teacher": "Shipped zoo teacher name, a run directory, a .safetensors checkpoint, an .onnx file, or package.module:factory / file.py:factory.",
    "student": "Zoo student NAME or NAME@WIDTH, auto (with --flops-budget), package.module:factory / file.py:factory, or a checkpoint to fine-tune.",
    "teacher_weights": "Weights (safetensors, or a torch.save'd state dict loaded with weights_only=True) for a factory teacher.",
    "teacher_mean": "The teacher's input normalization, per channel (one value or C): it is fed (pixel·scale − mean)/std. Default: what a kdedge checkpoint or ONNX teacher records, else the data's.",
    "teacher_std": "See --teacher-mean (e.g. --teacher-mean 0 --teacher-std 1 for a teacher trained on pixels/255).",
    "student_weights": "Initial weights for a zoo or factory student.",
    "flops_budget": "With --student auto: the largest zoo student (by FLOPs per sample) within this budget.",
    "loss": "hinton (alpha, temperature), dkd (decoupled KD), or hinton plus a feature term: fitnets (hints) or at (attention transfer).",
    "student_layer": "fitnets/at: student module whose output is matched (e.g. features.3).",
    "teacher_layer": "fitnets/at: teacher module whose output is the target (e.g. stages.1).",
    "feature_weight": "fitnets/at: weight of the feature term [default: 1 for fitnets, 1000 for at].",
    "alpha": "Weight of the distillation term in [0, 1]; 0 is plain supervised training.",
    "dkd_alpha": "DKD: weight of the target-class term TCKD.",
    "dkd_beta": "DKD: weight of the non-target-class term NCKD.",
    "dkd_warmup": "DKD: epochs over which the DKD term's weight rises linearly from 0 to 1.",
    "temperature": "Softmax temperature T of the distillation term.",
    "cache": "Teacher-logit cache: disk (~/.cache/kdedge/logits), memory or off.",
    "formats": "Export formats, comma-separated: onnx, onnx-int8, onnx-fp16, tensorrt; edge: executorch, litert, openvino, ort (ONNX Runtime's "
               "mobile format), each also as <name>-int8. auto: ONNX FP32+INT8, FP16/TensorRT with a GPU, and every installed edge runtime.",
    "calibration_samples": "Training images that calibrate static INT8.",
    "calibration_method": "INT8 calibration: minmax, entropy or percentile.",
    "parity_samples": "Test images every artifact is compared with PyTorch on.",
    "targets": "Benchmark targets, comma-separated: torch-cpu, torch-cuda, ort-cpu, ort-cuda, ort-trt, trt; edge: executorch-cpu, litert-cpu, "
               "openvino-cpu, ort-mobile-cpu.",
    "batch_sizes": "Benchmark batch sizes, comma-separated.",
    "bench_min_s": "Timed seconds per benchmark measurement.",
    "bench_threads": "Intra-op threads while benchmarking (default: each runtime's choice).",
    "min_retention": "Gate: student accuracy / teacher accuracy must reach this.",
    "max_quant_drop": "Gate: INT8 may lose at most this many accuracy points vs FP32.",
    "min_speedup": "Gate (optional): recommended artifact's batch-1 p50 speedup over the teacher in eager PyTorch.",
    "archive": "Also write BUNDLE.tar.gz.",
    "edge": "formats/targets auto also take every installed edge runtime (ExecuTorch, LiteRT, OpenVINO, ORT format): FP32 and INT8 artifacts, "
            "parity-checked and benchmarked against the teacher on each.",
    "tune_runtime": "Tune each CPU target's runtime settings (threads up to --deploy-threads; onnxruntime's graph optimization and execution mode, "
                    "OpenVINO's threads at its LATENCY hint) for the recommended artifact and the teacher, record the best in the manifest, and rank the "
                    "runtimes for `fastest` head to head at those settings.",
    "deploy_threads": "Threads the deployment gives the model: runtime tuning tries thread counts up to it, so `fastest` compares runtimes as they "
                      "will run; with --latency-budget, the search, the pruning and the decision time at it.",
    "latency_budget": "The student's p50 latency limit in milliseconds (e.g. 0.02 = 20 µs). search: the most accurate student within it. "
                      "compress-and-export: every --contenders lever is trained, made into --target's files at each precision it runs (FP32 and, "
                      "where it has it, INT8 by post-training quantization), scored on validation by that runtime and timed there together "
                      "(--deploy-threads, batch 1); the most accurate within the budget ships (--student is then a contender).",
    "contenders": "compress-and-export with --latency-budget: what competes for the budget, comma-separated: searched (kdedge search on --target), "
                  "pruned (the teacher pruned toward the budget), student (--student distilled).",
    "speedup": "prune: the pruned model's p50 on --target must be this many times faster than the original's (e.g. 4).",
    "flops_ratio": "prune: the pruned model's FLOPs as a fraction of the original's (e.g. 0.25), instead of a measured budget.",
    "criterion": 'prune: channel importance: magnitude (group L2), bn_scale (BatchNorm |γ|), taylor (|w·∂L/∂w|), or auto (each on step 1, best on validation).',
    "allocation": "prune: how a step spreads its removals: latency (importance per measured µs saved), uniform (the same share from every group), "
                  "or auto (both tried on step 1 with the best criterion; the better on validation goes on).",
    "steps": 'prune: prune-and-recover steps that reach the budget geometrically.',
    "step_epochs": 'prune: recovery epochs after each step but the last (which gets --epochs).',
    "criterion_epochs": "prune: with --criterion auto, recovery epochs of each criterion's trial.",
    "criterion_samples": "prune: with --criterion auto, training images of each criterion's trial.",
    "round_to": 'prune: keep channel counts multiples of this (kernels run faster on aligned widths; the narrowest group keeps this many).',
    "ignore_layers": 'prune: layers (module names, comma-separated) to keep whole, e.g. a layer the pruner cannot handle.',
    "weights": 'prune: weights for a factory MODEL (safetensors, or a state dict loaded with weights_only=True).',
    "prune": 'compress-and-export: the student is the teacher pruned to this measured speedup (onnxruntime, --bench-threads or 1 thread, batch 1) and recovered by distillation from it (--student is then ignored).',
    "prune_criterion": 'With --prune: channel importance (auto, magnitude, bn_scale, taylor).',
    "prune_allocation": 'With --prune: how steps spread their removals (auto, latency, uniform).',
    "prune_steps": 'With --prune: prune-and-recover steps.',
    "prune_step_epochs": 'With --prune: recovery epochs after each step but the last (which gets --epochs).',
    "prune_lr": "With --prune: the recovery's peak learning rate (a fine-tune of the teacher's weights).",
    "prune_round_to": 'With --prune: keep channel counts multiples of this.',
    "prune_ignore_layers": 'With --prune: teacher layers to keep whole (module names, comma-separated).',
    "target": "search, prune, compress-and-export --latency-budget: where latency is measured: ort-cpu (the exported ONNX in onnxruntime) or torch-cpu (eager PyTorch); search also "
              "executorch-cpu, litert-cpu, openvino-cpu, ort-mobile-cpu (each candidate exported to that runtime) and, with a GPU, torch-cuda, ort-cuda; "
              "compress-and-export takes all of search's.",
    "target_precision": "search: what the target runs: fp32, int8 (ort-cpu and the edge runtimes: the candidate quantized as kdedge export does) "
                        "or fp16 (CUDA targets).",
    "target_threads": "search, prune: intra-op threads of the deployment, used for every latency measurement.",
    "target_batch": "search, prune: batch size of the deployment, used for every latency measurement.",
    "time_budget": "search: minutes the whole search may take; ranking stops early to leave time for the finalists' full recipe.",
    "candidates": "search: architectures sampled from the search space (seeded by --seed).",
    "proxy_epochs": "search: epochs of the short distillation that ranks candidates.",
    "proxy_samples": "search: training images of that short distillation.",
    "finalists": "search: best-ranked candidates that get the full recipe; the best on validation is the student.",
    "generations": "search: rounds of evolution: mutations of the 5 best-ranked searched students are timed and ranked like the rest (0: sampling only).",
    "children": "search: mutations per generation.",
    "include_zoo": "search: also measure the zoo's students (tiny_cnn, dw_cnn, mlp at widths 1 and 0.5) as candidates and for comparison.",
    "qat": "Quantization-aware distillation of the trained FP32 --student (run directory or checkpoint): fake INT8 for --qat-scheme, "
           "from --teacher or, without one, from the FP32 student; its defaults are a fine-tune's (--epochs 4, --lr 0.005).",
    "qat_max_steps": "INT8 built from a quantization-aware model: its max |Δ| from that model's INT8 graph in PyTorch, in steps of the INT8 output.",
    "qat_min_agreement": "INT8 built from a quantization-aware model: smallest argmax agreement with that model's INT8 graph in PyTorch.",
    "skip_failed_int8": "An edge INT8 artifact that cannot be converted or fails parity is left out and named under skipped, the others kept "
                        "(compress-and-export always does this).",
    "qat_scheme": "With --qat (distill) or --int8 qat|auto (compress-and-export): the quantizer, as the runtime's INT8 export uses it: "
                  "xnnpack (ExecuTorch) or litert (LiteRT); with -per-tensor (xnnpack-per-tensor), one weight scale per tensor "
                  "instead of per output channel (its INT8 artifacts keep the granularity it trained with; in compress-and-export PTQ's too).",
    "int8": "compress-and-export: how INT8 is made: ptq (calibrated after training), qat (quantization-aware distillation of the "
            "distilled student, every INT8 artifact built with the scales it trained), auto (PTQ; QAD where PTQ loses more than --max-quant-drop).",
    "qat_epochs": "With --int8 qat|auto: epochs of quantization-aware distillation (a fine-tune).",
    "qat_lr": "With --int8 qat|auto: its peak learning rate.",
    "qat_calibration": "With --qat: training images that set the observers' ranges before the first step.",
    "log_dir": "Write TensorBoard event files here: loss parts, accuracy, learning rate and seconds per epoch, the final metrics "
               "(pip install 'kdedge-distill[tensorboard]'; view with tensorboard --logdir DIR).",
    "keep_float": "Layers the INT8 artifacts keep in float. compress-and-export: N (the N most sensitive, measured layer by layer on "
                  "validation) or auto (the fewest after which the simulated INT8 drop is within --max-quant-drop); distill --qat: "
                  "module names, comma-separated (kdedge sensitivity lists them).",
    "input_format": "What every artifact takes: float (normalized NCHW, the caller preprocesses), or uint8-nhwc / uint8-nchw (8-bit "
                    "pixels as decoded; scale, mean/std and layout in the artifact's graph).",
    "latency_cache": "search: reuse latencies measured before on this machine and software (~/.cache/kdedge/latency).",
    "block_kinds": "search: block kinds after the first (dense) one, of c (dense), d (depthwise-separable), r (residual), i (inverted residual).",
    "squeeze_excite": "search: the probability that a sampled or added block gets squeeze-excitation (q in its name).",
}


def _options_from(cls: type[_RunConfig], *, skip: tuple[str, ...] = ()):
    """One click option per config field (but ``skip``); defaults stay in the dataclass, not in click."""

    hints = typing.get_type_hints(cls)

    def decorate(func):
        for f in reversed([f for f in fields(cls) if f.name not in skip]):
            flag = "--" + f.name.replace("_", "-")
            types_ = [str if _element_type(t) else t for t in _allowed_types(hints[f.name]) if t is not type(None)]  # lists: "a,b,c"
            default = f.default if f.default is not MISSING else None
            show = f" [default: {default}]" if default not in (None, "") else ""
            if types_ == [bool]:
                func = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=_HELP.get(f.name, "") + show)(func)
            else:
                func = click.option(flag, f.name, type=types_[0], default=None, help=_HELP.get(f.name, "") + show)(func)
        return func

    return decorate


def _config(cls: type[_RunConfig], config_file: str | None, params: dict[str, Any], *, trust_code: bool, extra: tuple[str, ...] = ()) -> Any:
    """The config from ``config_file`` and the flags given on the command line (``extra``: keys of ``params`` set from arguments)."""
    ctx = click.get_current_context()
    explicit = {k: v for k, v in params.items() if k in extra or ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    config = load_config(cls, config_file, explicit, trust_code=trust_code)
    if getattr(config, "log_dir", None):  # every command that trains: one line before any work (search and prune train proxies first)
        from kdedge.tblog import check_available

        check_available()
    return config


#: Not a config field: trust comes from whoever runs the command, never from a YAML file someone sent.
_trust_code_option = click.option(
    "--trust-code", is_flag=True,
    help="Let a checkpoint whose architecture is a factory (file.py:make, package.module:make) import and run that code. "
         "Only for files you trust; a factory you name on the command line needs no flag.",
)


def _debug_from_env() -> bool:
    return os.environ.get("KDEDGE_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdedge-distill", prog_name="kdedge")
@click.option("--debug", is_flag=True,
              help="On an error, print the full traceback and its causes after the one-line message (or set KDEDGE_DEBUG=1).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Distill a large teacher into a small student and ship it to the edge."""
    if debug:
        ctx.ensure_object(dict)["debug"] = True  # read by main() when an error reaches it


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file whose keys mirror these flags; flags win.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_trust_code_option
@_options_from(TrainConfig)
def train(config_file: str | None, quiet: bool, trust_code: bool, **params: Any) -> None:
    """Supervised training of a zoo model (how teachers are trained)."""
    from kdedge.runs import run_train

    result = run_train(_config(TrainConfig, config_file, params, trust_code=trust_code), progress=not quiet, trust_code=trust_code)
    _summary(result)


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file whose keys mirror these flags; flags win.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_trust_code_option
@_options_from(DistillConfig)
@_options_from(QATConfig, skip=tuple(f.name for f in fields(DistillConfig)))
def distill(config_file: str | None, quiet: bool, trust_code: bool, **params: Any) -> None:
    """Distill a teacher into a student with Hinton's loss.

    With no arguments: the shipped Fashion-MNIST teacher into tiny_cnn. With --qat: quantization-aware
    distillation of a trained FP32 --student (a run directory or checkpoint) for --qat-scheme's
    runtime (xnnpack: ExecuTorch, litert: LiteRT), from --teacher or, without one, from the FP32
    student itself; its INT8 artifacts (kdedge export --format onnx-int8,executorch-int8,litert-int8,openvino-int8) ship the scales it was trained with.
    """
    from kdedge.runs import run_distill

    ctx = click.get_current_context()
    given = {k for k in params if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    if params.get("qat") or (params.get("qat") is None and _yaml_key(config_file, "qat")):
        from kdedge.qat import run_qat

        result = run_qat(_config(QATConfig, config_file, params, trust_code=trust_code), progress=not quiet, trust_code=trust_code)
        _summary(result)
        return
    qat_only = sorted(f"--{k.replace('_', '-')}" for k in given if k.startswith("qat_") or k == "keep_float")
    if qat_only:
        raise ConfigError(f"{', '.join(qat_only)} {'applies' if len(qat_only) == 1 else 'apply'} to quantization-aware training: "
                          "add --qat (with a trained --student)")
    params = {k: v for k, v in params.items() if not k.startswith("qat_") and k not in ("qat", "keep_float")}
    result = run_distill(_config(DistillConfig, config_file, params, trust_code=trust_code), progress=not quiet, trust_code=trust_code)
    _summary(result)



@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file whose keys mirror these flags; flags win.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@_trust_code_option
@_options_from(SearchConfig, skip=("student", "student_weights", "flops_budget"))
def search(config_file: str | None, quiet: bool, trust_code: bool, **params: Any) -> None:
    """The most accurate student within --latency-budget ms, timed on the target.

    Samples architectures, times each exported candidate on --target with --target-threads at
    --target-batch (the deployment's settings; cached per machine), drops those over budget,
    ranks the rest by a short distillation, gives the best --finalists the full recipe and writes
    OUT/search.json, OUT/student/ (a distill run directory) and OUT/accuracy_vs_latency.png.
    """
    from kdedge.search import run_search

    result = run_search(_config(SearchConfig, config_file, params, trust_code=trust_code), progress=not quiet,
                        log=None if quiet else click.echo, trust_code=trust_code)
    r = result.record
    fin, teacher = r["finalists"][result.winner], r["teacher"]
    click.echo(f"student {result.winner}: p50 {_num(r['winner_p50_ms'], ' ms')} (budget {r['target']['latency_budget_ms']:.4f} ms), "
               f"val {_num(fin['val_accuracy'])}, test {_num(fin['test_accuracy'])} | teacher p50 {_num(teacher['p50_ms'], ' ms')}"
               + (f" ({teacher['latency_unknown']})" if teacher.get("latency_unknown") else "") + f", val {_num(teacher['val_accuracy'])}")
    click.echo(f"wrote {result.out}")


@cli.command()
@click.argument("model", required=False)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file whose keys mirror these flags; flags win.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@_trust_code_option
@_options_from(PruneConfig, skip=("model", "student", "student_weights", "flops_budget"))
def prune(model: str | None, config_file: str | None, quiet: bool, trust_code: bool, **params: Any) -> None:
    """Make MODEL (a run directory, a checkpoint, a shipped zoo name, or a factory with --weights) faster by removing channels.

    Exactly one budget: --speedup X (its p50 on --target at --target-threads and --target-batch),
    --latency-budget MS, or --flops-ratio R. Channels go in --steps steps, chosen by importance per
    unit of measured latency; each step recovers by distillation from the unpruned model (or
    --teacher). Writes a run directory whose model.safetensors reloads by name, without pickle.
    """
    from kdedge.pruning import run_prune

    if model is not None:
        params["model"] = model
    config = _config(PruneConfig, config_file, params, trust_code=trust_code, extra=("model",) if model is not None else ())
    result = run_prune(config, progress=not quiet, log=None if quiet else click.echo, trust_code=trust_code)
    if result.out is None:
        return  # a non-zero rank under torchrun
    r = result.record["result"]
    gain = (f"p50 {_num(r['p50_ms'], ' ms')} vs {_num(r['original_p50_ms'], ' ms')} ({r['speedup']:.2f}× faster)" if r["kind"] == "latency"
            else f"{r['flops_ratio']:.3f} of the FLOPs")
    click.echo(f"{result.spec.name if result.spec else 'pruned model'}: {gain}, {r['flops'] / 1e6:.2f} vs {r['original_flops'] / 1e6:.2f} MFLOPs, "
               f"{r['params']:,} vs {r['original_params']:,} params, criterion {result.record['criterion']}, test accuracy {result.run.test.accuracy:.4f}")
    click.echo(f"wrote {result.out}")


def _num(value: float | None, unit: str = "") -> str:
    """A measured number, or "unknown" where it could not be measured (an ONNX teacher's latency on torch-cpu)."""
    return "unknown" if value is None else f"{value:.4f}{unit}"


@cli.command()
@click.argument("source")
@click.option("--format", "formats", multiple=True, help="onnx, onnx-int8, onnx-fp16, tensorrt, executorch[-int8], litert[-int8], openvino[-int8], "
              "ort[-int8]; repeat or comma-separate. [default: onnx,onnx-int8]")
@click.option("--data", help="Dataset for parity, calibration and accuracy [default: the one recorded in the checkpoint].")
@click.option("--image-size", type=int, help="Image folders: the shorter-side resize and crop [default: the one recorded in the checkpoint].")
@click.option("--layout", help="Arrays: NCHW or NHWC, for a shape that could be either.")
@click.option("--opset", type=int, help="ONNX opset (18..23). [default: 18]")
@click.option("--parity-samples", type=int, help="Real test inputs compared with PyTorch (batch N; the first 16 also at batch 1). [default: 1000]")
@click.option("--calibration-samples", type=int, help="Training inputs that calibrate static INT8. [default: 512]")
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), help="Static INT8 calibration. [default: minmax]")
@click.option("--quantization", type=click.Choice(["static", "dynamic"]), help="INT8 mode: static QDQ (calibrated) or dynamic. [default: static]")
@click.option("--per-channel/--per-tensor", "per_channel", default=None, help="Per-channel INT8 weight scales. [default: per-channel; a quantization-aware run: its own]")
@click.option("--reduce-range/--full-range", "reduce_range", default=None, help="7-bit INT8 weights for CPU (avoids x86 U8S8 saturation; measured +0.6 pt on the teacher). [default: reduce-range]")
@click.option("--keep-float", "keep_float", help="Layers every INT8 artifact keeps in float: module names, comma-separated (kdedge sensitivity ranks them).")
@click.option("--input-format", type=click.Choice(["float", "uint8-nhwc", "uint8-nchw"]),
              help="What every artifact takes: normalized float NCHW, or 8-bit pixels with scale, mean/std and layout in its graph. [default: float]")
@click.option("--allow-mismatch", is_flag=True, default=None, help="Keep artifacts that fail parity (the failure is recorded in export.json).")
@click.option("--no-evaluate", "evaluate", flag_value=False, default=None, help="Skip measuring each artifact's test accuracy.")
@click.option("--slim", is_flag=True, default=None, help="Simplify the ONNX graph with onnxslim when that removes nodes.")
@click.option("--trt-precision", type=click.Choice(["fp32", "fp16", "int8"]), help="TensorRT engine precision. [default: fp16]")
@click.option("--trt-batch", help="TensorRT batch profile MIN,OPT,MAX. [default: 1,32,256]")
@click.option("--trt-workspace-mib", type=int, help="TensorRT builder workspace in MiB. [default: 1024]")
@click.option("--edge-max-batch", type=int, help="The largest batch an ExecuTorch or LiteRT artifact takes (ExecuTorch plans its memory for it). [default: 256]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file whose keys mirror these flags; flags win.")
@click.option("--out", help="Export directory to create (default runs/export-<time>); must not exist.")
@_trust_code_option
def export(source: str, config_file: str | None, formats: tuple[str, ...], trust_code: bool, **params: Any) -> None:
    """Export SOURCE (a run directory, a .safetensors checkpoint or a shipped zoo name) to ONNX,
    INT8, FP16, TensorRT and the edge runtimes (ExecuTorch, LiteRT, OpenVINO, ORT format), checking
    every artifact against PyTorch on real test inputs, each in its own runtime.
    """
    from kdedge.config import ExportConfig
    from kdedge.errors import BackendUnavailable
    from kdedge.exporters import export_checkpoint

    overrides = {k: v for k, v in params.items() if v is not None}
    if formats:
        overrides["formats"] = [f.strip() for spec in formats for f in spec.split(",") if f.strip()]
    config = load_config(ExportConfig, config_file, overrides)
    result = export_checkpoint(source, config, trust_code=trust_code, log=click.echo)
    for a in result.artifacts:
        p = a.parity["outputs"][0] if a.parity else None
        parts = [f"{a.path:<22} {a.bytes / 1024:8.1f} KiB"]
        if p:
            parts.append(f"max|Δ| {p['max_abs_diff']:.2e}  argmax {p['argmax_agreement']:.2%}{'' if a.parity['passed'] else '  PARITY FAILED (kept: --allow-mismatch)'}")
        if a.accuracy:
            parts.append(f"test acc {a.accuracy['accuracy']:.4f}" + (f" (Δ {-a.accuracy['drop_vs_fp32_pt']:+.2f} pt)" if "drop_vs_fp32_pt" in a.accuracy else ""))
        click.echo("  ".join(parts))
    click.echo(f"wrote {result.out}")
    if result.skipped:
        raise BackendUnavailable("; ".join(f"{fmt} not built: {why}" for fmt, why in result.skipped.items()) + f" (the ONNX artifacts are in {result.out})")


@cli.command()
@click.argument("models", nargs=-1)
@click.option("--teacher", help="The teacher (run dir, checkpoint, export dir, .onnx, .plan or shipped name); MODELs are then compared with it.")
@click.option("--data", help="Dataset whose test images feed latency batches and accuracy; must be the one the models record. "
              "[default: the dataset recorded with the model]")
@click.option("--targets", help="Comma-separated: torch-cpu, torch-cuda, ort-cpu, ort-cuda, ort-trt, trt, executorch-cpu, litert-cpu, openvino-cpu, "
              "ort-mobile-cpu. [default: torch-cpu,ort-cpu]")
@click.option("--batch-sizes", help="Comma-separated batch sizes. [default: 1,8,32,128]")
@click.option("--threads", type=int, help="Intra-op threads of every runtime [default: each runtime's choice].")
@click.option("--streams", type=int, help="Also measure throughput with K concurrent sessions. [default: 1 = off]")
@click.option("--warmup-iters", type=int, help="Warm-up calls before timing. [default: 10]")
@click.option("--min-iters", type=int, help="Timed calls at least. [default: 50]")
@click.option("--min-s", type=float, help="Timed seconds at least. [default: 1.0]")
@click.option("--test-limit", type=int, help="Use only N test images for accuracy (a seeded subset with every class in its share).")
@click.option("--image-size", type=int, help="Image folders: the shorter-side resize and crop [default: the one the models record].")
@click.option("--layout", help="Arrays: NCHW or NHWC, for a shape that could be either.")
@click.option("--no-accuracy", "accuracy", flag_value=False, default=None, help="Skip measuring accuracy.")
@click.option("--export-variants", help="Variants exported from checkpoints for the onnxruntime and edge targets (fp32, int8; fp16 for ONNX). "
              "[default: fp32,int8]")
@click.option("--no-plots", "plots", flag_value=False, default=None, help="Skip the PNG plots.")
@click.option("--compare", "compare", nargs=2, type=click.Path(), help="Compare two reports (A B): ratios B/A, flagged beyond measured noise.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file whose keys mirror these flags; flags win.")
@click.option("--out", help="Report directory to create (default runs/bench-<time>); must not exist.")
@_trust_code_option
def bench(models: tuple[str, ...], teacher: str | None, compare: tuple[str, str] | None, config_file: str | None, trust_code: bool,
          **params: Any) -> None:
    """Latency, throughput, accuracy and size of MODELs (run dirs, checkpoints, export dirs, .onnx, .plan,
    .pte, .tflite, OpenVINO .xml, .ort) on each target, with teacher-vs-student ratios when --teacher is given.
    """
    if compare:
        from kdedge.bench.report import compare_reports, load_report, render_comparison

        click.echo(render_comparison(compare_reports(load_report(compare[0]), load_report(compare[1]))))
        return
    from kdedge.bench.harness import run_bench
    from kdedge.config import BenchConfig

    overrides = {k: v for k, v in params.items() if v is not None}
    config = load_config(BenchConfig, config_file, overrides)
    report, out = run_bench(list(models), teacher=teacher, config=config, log=click.echo, trust_code=trust_code)
    for c in report["comparison"]:
        if c["batch"] == min(config.batch_sizes):
            click.echo(f"student {c['student_variant']}@{c['student_target']} vs teacher {c['teacher_variant']}@{c['teacher_target']} (batch {c['batch']}): "
                       f"{c['latency_speedup']:.1f}x faster, accuracy {c.get('accuracy_delta_pt', float('nan')):+.2f} pt")
    click.echo(f"wrote {out}")


@cli.command("compress-and-export")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file whose keys mirror these flags; flags win.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@_trust_code_option
@_options_from(CompressConfig)
def compress_and_export_cmd(config_file: str | None, quiet: bool, trust_code: bool, **params: Any) -> None:
    """Teacher -> distilled student -> parity-checked ONNX (FP32, INT8; FP16/TensorRT on GPUs) ->
    benchmark vs the teacher -> gates -> a verifiable deployment bundle.

    With no arguments: the shipped Fashion-MNIST teacher into tiny_cnn, benchmarked on the CPU.
    Exit codes: 0 bundle written, 2 bad input, 3 a gate failed (candidate kept at OUT.rejected).
    """
    _run_bundle(_config(CompressConfig, config_file, params, trust_code=trust_code), quiet, trust_code=trust_code)


@cli.command()
@click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False), help="The deployment config (YAML keys of compress-and-export).")
@click.option("--out", help="Bundle directory to create; overrides the config's out.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@_trust_code_option
def build(config_file: str, out: str | None, quiet: bool, trust_code: bool) -> None:
    """Build a deployment bundle from a committed config (for CI pipelines).

    Same config and seed on the CPU -> identical student weights and artifacts, and a manifest
    equal apart from timestamps and timings.
    """
    _run_bundle(load_config(CompressConfig, config_file, {"out": out} if out else {}, trust_code=trust_code), quiet, trust_code=trust_code)


def _run_bundle(config: Any, quiet: bool, *, trust_code: bool) -> None:
    from kdedge.bundle import compress_and_export

    result = compress_and_export(config, progress=not quiet, log=None if quiet else click.echo, trust_code=trust_code)
    m = result.manifest
    for target, rec in m["recommended"].items():
        click.echo(f"recommended for {target}: {rec['artifact']} ({rec['p50_ms']:.4f} ms at batch {rec['batch']}, accuracy {rec['accuracy']:.4f})")
    click.echo("gates: " + ", ".join(f"{k} {g['value']:.4g} (limit {g['limit']}) ok" for k, g in m["gates"].items()))
    click.echo(f"wrote {result.out}" + (f" and {result.archive}" if result.archive else ""))


@cli.command()
@click.argument("source")
@click.option("--data", help="Dataset [default: the one recorded in the checkpoint]; scored on its validation split, else on 10 % of its "
                           "training images held out as --val-split 0.1 holds them out.")
@click.option("--image-size", type=int, help="Image folders: the shorter-side resize and crop [default: the one recorded in the checkpoint].")
@click.option("--calibration-samples", type=int, default=512, show_default=True, help="Training images that calibrate the activation ranges.")
@click.option("--per-channel/--per-tensor", "per_channel", default=True, help="INT8 weight scales per output channel, or one per tensor as "
                                                                               "export --per-tensor and the -per-tensor QAT schemes. [default: per-channel]")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the result as JSON here.")
@_trust_code_option
def sensitivity(source: str, data: str | None, image_size: int | None, calibration_samples: int, per_channel: bool, json_path: str | None,
                trust_code: bool) -> None:
    """Per-layer INT8 sensitivity of SOURCE (run directory, checkpoint or shipped name): validation accuracy with only that
    layer quantized (ExecuTorch's XNNPACK quantizer, in PyTorch), most sensitive first; the names go to --keep-float.
    """
    import json

    from kdedge.exporters.export import load_source
    from kdedge.sensitivity import layer_sensitivity

    if calibration_samples < 1:
        raise ConfigError(f"--calibration-samples must be at least 1, got {calibration_samples}")
    ckpt, splits = load_source(source, data=data, image_size=image_size, trust_code=trust_code)
    scored = "validation" if splits.val is not None else "held-out training"
    if splits.val is None:  # the images kdedge's --val-split 0.1 holds out (same seed): unseen by a model trained with it
        from kdedge.data.sources import hold_out

        splits = hold_out(splits, 0.1)
    result = layer_sensitivity(ckpt.model, splits.val, splits.train.sample(calibration_samples, seed=0).numpy(), log=click.echo,  # type: ignore[arg-type]
                               per_channel=per_channel)
    click.echo(f"{ckpt.spec.name} on {result.images} {scored} images: FP32 {result.fp32_accuracy:.4f}, "
               f"all INT8 {result.int8_accuracy:.4f} ({result.int8_drop_pt:+.2f} pt)")
    click.echo(f"{'layer':<24} {'only it INT8':>12} {'drop (pt)':>9}")
    for row in result.layers:
        click.echo(f"{row.layer:<24} {row.accuracy:>12.4f} {row.drop_pt:>+9.2f}")
    if json_path:
        Path(json_path).write_text(json.dumps({"model": ckpt.spec.name, **result.to_dict()}, indent=2) + "\n")
        click.echo(f"wrote {json_path}")


@cli.command()
@click.argument("bundle")
@click.option("--strict", is_flag=True, help="Fail when an artifact cannot be run here (its edge runtime is not installed), instead of listing it.")
def verify(bundle: str, strict: bool) -> None:
    """Check a bundle (directory or .tar.gz): every sha256 in its manifest, and each model in its own runtime on a smoke batch."""
    from kdedge.bundle import verify_bundle

    summary = verify_bundle(bundle, strict=strict)
    for rel, why in summary["not_run"].items():
        click.echo(f"not run: {rel}: {why}", err=True)
    click.echo(f"ok: {summary['files']} files match the manifest, {len(summary['models_run'])} models ran in their runtimes "
               f"({summary['onnx_models_run']} ONNX models ran in onnxruntime)" + (f", {len(summary['not_run'])} not run" if summary["not_run"] else ""))


@cli.command()
@click.argument("name", default="fashion-mnist")
def data(name: str) -> None:
    """Find built-in dataset NAME locally (or download it) and print its directory.

    Looks in $KDEDGE_DATA/NAME, ~/.cache/kdedge/NAME and /usr/share/datasets/NAME, then
    downloads the official files into ~/.cache/kdedge/NAME, checking their sha256.
    """
    from kdedge.data import locate_dataset

    click.echo(str(locate_dataset(name)))


def _yaml_key(config_file: str | None, key: str) -> Any:
    """``key`` of a YAML config file, or None (an unreadable file is reported by ``load_config``)."""
    if not config_file:
        return None
    try:
        import yaml

        data = yaml.safe_load(Path(config_file).read_text())
    except Exception:  # load_config reads it again and says what is wrong
        return None
    return data.get(key) if isinstance(data, dict) else None


def _summary(result: Any) -> None:
    if result.out is None:
        return  # a non-zero rank under torchrun: rank 0 reports and writes
    m = result.metrics
    line = f"{m['model']['name']}: test accuracy {m['test']['accuracy']:.4f}, macro F1 {m['test']['macro_f1']:.4f}, {m['model']['params']:,} params"
    if "teacher" in m and m["teacher"].get("test"):
        t = m["teacher"]
        line += f" | teacher accuracy {t['test']['accuracy']:.4f}, " + (f"{t['params']:,} params" if t.get("params") is not None else "parameters unknown (ONNX)")
    click.echo(line)
    if "qat" in m:
        q = m["qat"]
        fp32 = next((v for k, v in q["fp32"].items() if v is not None), None)
        split = next(iter(q["fp32"]), "").replace("_accuracy", "")
        click.echo(f"quantization-aware ({q['scheme']}): {split} accuracy {m.get(split, {}).get('accuracy', float('nan')):.4f} with fake INT8 vs "
                   f"{fp32:.4f} for the FP32 student; kdedge export {result.out} --format onnx-int8,executorch-int8,litert-int8 ships the scales it trained with"
                   if fp32 is not None else f"quantization-aware ({q['scheme']}); kdedge export {result.out} --format onnx-int8,executorch-int8,litert-int8")
    click.echo(f"wrote {result.out}")


def _show_every_cause(exc: BaseException) -> None:
    """Un-hide the causes raised ``from None`` along the chain: in debug mode no link is left out."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__suppress_context__ = False
        link = link.__cause__ or link.__context__


def _echo_traceback(exc: BaseException) -> None:
    _show_every_cause(exc)
    click.echo("".join(traceback.format_exception(exc)).rstrip("\n"), err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input becomes one line on stderr and exit code 2, never a traceback.

    With ``kdedge --debug`` or ``KDEDGE_DEBUG=1`` the full traceback, every chained cause included
    (down to the line in a user's factory or inside the exporter), follows that line; the exit
    code stays the same. Any other exception is not bad input but a bug in kdedge or an error in
    the user's own model code: it gets one line saying so and propagates with its traceback.
    """
    state = {"debug": _debug_from_env()}  # the group's --debug sets it too
    try:
        cli.main(args=argv, prog_name="kdedge", standalone_mode=False, obj=state)
    except KdedgeError as exc:
        click.echo(f"kdedge: error: {exc}", err=True)
        if state["debug"]:
            _echo_traceback(exc)
        return getattr(exc, "exit_code", 2)  # 3: a gate failed (the input was fine, the model was not good enough)
    except click.exceptions.Abort as exc:
        click.echo("kdedge: interrupted", err=True)
        if state["debug"]:
            _echo_traceback(exc)  # where it was when interrupted
        return 130
    except click.ClickException as exc:
        click.echo(f"kdedge: error: {exc.format_message()} (see kdedge --help)", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("kdedge: interrupted", err=True)
        return 130
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        click.echo(f"kdedge: unexpected {type(exc).__name__}: {first}; not an input error kdedge checks for: the traceback below shows "
                   "whether it comes from your model's code, the environment or kdedge (please report kdedge bugs with it)", err=True)
        if state["debug"]:
            _show_every_cause(exc)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

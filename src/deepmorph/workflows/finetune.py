"""Fine-tuning a trained run on new data (domain adaptation, survey transfer), for any task.

``finetune(task, source, data, out, freeze=...)`` starts from the source run's architecture and
weights (:func:`deepmorph.training.load_weights`), freezes what ``freeze`` says (the lecture's
three choices: the head only, the first K blocks, or nothing), and trains on ``data`` with the
task's own workflow, so the new run has the same files, metrics and prediction tools as any other.
When the target's outputs differ from the source's (other classes, other parameters) the head is
replaced by a fresh one of the right size. The normalisation is fitted again on the target's
training images: a new survey's sky noise sets a new asinh softening.
"""

from __future__ import annotations

from pathlib import Path

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.workflows.classify import Split

TASKS = ("classify", "morphometry")


def _source_config(source: Path, freeze: str, new_head: bool, overrides: dict | None):
    from deepmorph.training import RunConfig
    from deepmorph.training.finetune import parse_freeze_mode

    parse_freeze_mode(freeze)
    path = source / "config.yaml"
    if not path.is_file():
        raise DeepmorphIOError(f"{source}: no config.yaml (not a training run)")
    config = RunConfig.from_yaml(path).with_overrides({
        "finetune": {"weights": str(source), "freeze": freeze, "new_head": bool(new_head)},
        "normalization": {"kind": "asinh", "scale": "auto", "mean": None, "std": None},
    })
    return config.with_overrides(overrides) if overrides else config


def finetune(task: str, source: str | Path, data: str | Path, out: str | Path, freeze: str = "head",
             split: Split | None = None, overrides: dict | None = None, parameters=None) -> dict:
    """Fine-tune the run ``source`` on ``data`` into the run ``out``.

    Parameters
    ----------
    task : {"classify", "morphometry"}
        The source run's task.
    source : path
        A trained run of that task.
    data : path
        The target dataset (labelled for classification; with the catalogue's truth for
        morphometry).
    out : path
        The new run directory.
    freeze : {"head", "blocks:K", "none"}
        What stays fixed: everything but the head; the first K blocks; nothing.
    split : Split, optional
        Split of the target data; ``train_size`` sets how many labelled target galaxies are used.
    overrides : dict, optional
        Run-config overrides (epochs, learning rate...), applied after the source's config.
    parameters : sequence of str, optional
        Morphometry parameters to predict (default: the source's).

    Returns
    -------
    dict
        The task workflow's result (test metrics on the target's held-out split, ``train_size``...)
        plus ``new_head`` (whether the head was replaced).
    """
    source, data, out = Path(source), Path(data), Path(out)
    if task not in TASKS:
        raise DeepmorphValueError(f"unknown task {task!r} to fine-tune; choose from {', '.join(TASKS)}")
    split = split or Split()
    if task == "classify":
        from deepmorph.workflows.classify import _dataset_info, load_run, train_cnn

        meta = load_run(source)
        if meta["method"] != "cnn":
            raise DeepmorphValueError(f"{source}: a {meta['method']} run has no network to fine-tune")
        _, names, _ = _dataset_info(data)
        new_head = list(names) != list(meta["label_names"])
        result = train_cnn(data, out, _source_config(source, freeze, new_head, overrides), split)
    else:
        from deepmorph.tasks.regress import TargetCoder
        from deepmorph.workflows.morphometry import train_morphometry
        from deepmorph.workflows.runs import read_run

        meta = read_run(source, "morphometry")
        params = tuple(parameters) if parameters else tuple(meta["parameters"])
        new_head = list(params) != list(meta["parameters"])
        # The source's head keeps the source's target coding (a few target labels would refit it
        # into other units); a new head gets a coding fitted on the target.
        coder = None if new_head else TargetCoder.from_dict(meta["coder"])
        result = train_morphometry(data, out, _source_config(source, freeze, new_head, overrides), split,
                                   parameters=params, coder=coder)
    return {**result, "new_head": new_head}

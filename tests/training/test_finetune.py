"""Fine-tuning: frozen weights and BatchNorm statistics stay bit-identical; weights load into new heads."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.models import SimpleCNN
from deepmorph.tasks import ClassifyTask
from deepmorph.training import RunConfig, build_model, fit, freeze, load_weights
from tests.training.toys import loaders

CONFIG = RunConfig(model={"kwargs": {"widths": [4, 8], "dropout": 0.0}}, optimizer={"name": "adamw", "lr": 0.01,
                   "weight_decay": 0.1}, epochs=2, progress_bar=False, accelerator="cpu")


def _train(model: torch.nn.Module, epochs: int = 2) -> None:
    train, val = loaders(n_train=64, n_val=32, batch_size=16)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(ClassifyTask(model, CONFIG, 2), train, val)


@pytest.mark.parametrize("mode, frozen_prefixes", [("blocks:1", ("blocks.0.",)), ("head", ("blocks.", "noise."))])
def test_frozen_weights_and_batchnorm_stats_are_bit_identical(mode, frozen_prefixes):
    torch.manual_seed(0)
    model = SimpleCNN(1, 2, widths=(4, 8), dropout=0.0)
    trainable = freeze(model, mode)
    assert trainable == [n for n, _ in model.named_parameters() if not n.startswith(frozen_prefixes)]
    before = {key: value.clone() for key, value in model.state_dict().items()}
    _train(model)
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith(frozen_prefixes):  # weights, biases, running mean/var, num_batches_tracked
            assert torch.equal(after[key], value), f"frozen {key} changed"
        elif key in trainable or "running_mean" in key:
            assert not torch.equal(after[key], value), f"trainable {key} did not change"
    if mode == "blocks:1":  # the unfrozen block's statistics still update
        assert after["blocks.1.1.num_batches_tracked"] > 0 and after["blocks.0.1.num_batches_tracked"] == 0


def test_frozen_batchnorm_stays_in_eval_mode():
    model = SimpleCNN(1, 2, widths=(4, 8))
    freeze(model, "blocks:1")
    model.train()
    model(torch.randn(2, 1, 8, 8))
    assert not model.blocks[0][1].training and model.blocks[1][1].training
    freeze(model, "none")  # unfreezing restores the normal behaviour
    model.train()
    model(torch.randn(2, 1, 8, 8))
    assert model.blocks[0][1].training and all(p.requires_grad for p in model.parameters())


def test_frozen_dropout_is_off_so_a_new_head_sees_the_features_it_will_predict_on():
    torch.manual_seed(0)
    model = SimpleCNN(1, 2, widths=(4, 8), dropout=0.5)
    freeze(model, "head")
    model.train()
    x = torch.randn(4, 1, 8, 8)
    features = model.forward_features(x)  # frozen part: deterministic, like at prediction time
    assert torch.equal(features, model.forward_features(x))
    model.eval()
    assert torch.equal(features, model.forward_features(x))
    model.train()
    head_dropout = [m for m in model.head.modules() if isinstance(m, torch.nn.Dropout)]
    model(x)
    assert head_dropout and all(m.training for m in head_dropout)  # the trainable head keeps its dropout


def test_freeze_errors():
    model = SimpleCNN(1, 2, widths=(4, 8))
    with pytest.raises(DeepmorphValueError, match="has 2 blocks"):
        freeze(model, "blocks:3")
    with pytest.raises(DeepmorphValueError, match="'none', 'head' or 'blocks:K'"):
        freeze(model, "tail")
    with pytest.raises(DeepmorphValueError, match="no 'head'"):
        freeze(torch.nn.Linear(2, 2), "head")


def test_load_weights_into_a_new_head(tmp_path):
    train, val = loaders(n_train=32, n_val=16, batch_size=16)
    source = build_model(CONFIG, num_outputs=2)
    fit(ClassifyTask(source, CONFIG, 2), train, val, CONFIG.with_overrides({"epochs": 1}), tmp_path / "run")
    trained = source.state_dict()

    target = SimpleCNN(1, 4, widths=(4, 8), dropout=0.0)  # 4 classes instead of 2
    fresh_head = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("head.")}
    with pytest.raises(DeepmorphValueError, match="pass new_head=True"):
        load_weights(target, tmp_path / "run")
    loaded = load_weights(target, tmp_path / "run", strict=True, new_head=True)
    assert loaded.path.name == "model.pt" and not loaded.missing_keys and not loaded.unexpected_keys
    for key, value in target.state_dict().items():
        expected = fresh_head[key] if key.startswith("head.") else trained[key]
        assert torch.equal(value, expected), key

    # the same from the Lightning checkpoint (keys prefixed with "model.")
    other = SimpleCNN(1, 4, widths=(4, 8), dropout=0.0)
    load_weights(other, tmp_path / "run" / "checkpoints" / "last.ckpt", new_head=True)
    assert torch.equal(other.blocks[0][0].weight, trained["blocks.0.0.weight"])

    # build_model: load, then freeze, from the config
    config = CONFIG.with_overrides({"finetune": {"weights": str(tmp_path / "run"), "new_head": True, "freeze": "head"}})
    model = build_model(config, num_outputs=3)
    assert torch.equal(model.blocks[1][0].weight, trained["blocks.1.0.weight"])
    head = [f"head.{name}" for name, _ in model.head.named_parameters()]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == head and len(head) == 2


def test_load_weights_errors(tmp_path):
    model = SimpleCNN(1, 2, widths=(4, 8))
    with pytest.raises(DeepmorphIOError, match="no such weights file"):
        load_weights(model, tmp_path / "missing.pt")
    with pytest.raises(DeepmorphIOError, match="no weights found"):
        load_weights(model, tmp_path)
    torch.save({"blocks.0.0.weight": model.blocks[0][0].weight.detach()}, tmp_path / "partial.pt")
    assert load_weights(model, tmp_path / "partial.pt").missing_keys  # not strict: reported
    with pytest.raises(DeepmorphValueError, match="missing blocks.0.1.weight"):
        load_weights(model, tmp_path / "partial.pt", strict=True)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DeepmorphIOError, match="cannot read weights"):
        load_weights(model, tmp_path / "junk.pt")

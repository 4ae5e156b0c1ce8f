"""RemoteOptimizer in the training loops people use, as they would write them: the Hugging Face
Trainer with its default linear schedule, and a Lightning Trainer with a torch lr scheduler.
Each trains as the local torch optimizer does (same schedule, same batches), and resuming from
the framework's own checkpoint gives the uninterrupted run's weights."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from optserve.client import RemoteOptimizer

STEPS, BATCH, LR = 12, 16, 0.01


def _digits(n: int = STEPS // 2 * BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:n], dtype=torch.float32) / 16.0, torch.tensor(y[:n])


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        scale = max(b[name].abs().max().item(), 1e-12)
        assert (a[name] - b[name]).abs().max().item() <= 1e-6 * scale, name


# ---- Hugging Face Trainer ---------------------------------------------------------------------


class _HFModel(torch.nn.Module):
    """What the Trainer calls: forward(**batch) -> {"loss", "logits"}."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = _net(seed)

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def _hf_train(tmp_path, make_optimizer, *, seed: int = 0, resume: str | None = None):
    transformers = pytest.importorskip("transformers")
    x, y = _digits()
    data = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    model = _HFModel(seed)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH,
        learning_rate=LR, warmup_steps=2, save_strategy="steps", save_steps=STEPS // 2,
        logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, optimizers=(make_optimizer(model), None)
    )
    trainer.train(resume_from_checkpoint=resume)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_hugging_face_trainer(service, model_name, tmp_path):
    def remote(model):
        return RemoteOptimizer(model.named_parameters(), address=service.address,
                               model=model_name, optimizer={"name": "adamw", "lr": LR,
                                                            "weight_decay": 0.0})  # fmt: skip

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)

    local = _hf_train(tmp_path / "local", adamw)
    straight = _hf_train(tmp_path / "remote", remote)
    _assert_same(straight, local)
    # A new process resumes from the Trainer's checkpoint at step 6 (the server went on to 12).
    checkpoint = os.path.join(tmp_path / "remote", f"checkpoint-{STEPS // 2}")
    resumed = _hf_train(tmp_path / "remote", remote, seed=7, resume=checkpoint)
    _assert_same(resumed, straight)


# ---- Lightning ------------------------------------------------------------------------------


def _lightning_train(tmp_path, make_optimizer, *, seed: int = 0, resume: str | None = None):
    lightning = pytest.importorskip("lightning")
    x, y = _digits()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)

    class Digits(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net(seed)

        def training_step(self, batch, index):
            inputs, labels = batch
            return torch.nn.functional.cross_entropy(self.net(inputs), labels)

        def configure_optimizers(self):
            optimizer = make_optimizer(self)
            schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": schedule, "interval": "step"}}  # fmt: skip

    module = Digits()
    logging.getLogger("lightning").setLevel(logging.WARNING)
    trainer = lightning.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path,
        callbacks=[lightning.pytorch.callbacks.ModelCheckpoint(
            dirpath=tmp_path, every_n_train_steps=STEPS // 2, save_top_k=-1)],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        gradient_clip_val=1.0,
    )  # fmt: skip
    trainer.fit(module, loader, ckpt_path=resume)
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}


@pytest.mark.slow
def test_lightning_trainer(service, model_name, tmp_path):
    def remote(module):
        return RemoteOptimizer(module.named_parameters(), address=service.address,
                               model=model_name, optimizer={"name": "adam", "lr": LR})  # fmt: skip

    local = _lightning_train(tmp_path / "local",
                             lambda m: torch.optim.Adam(m.parameters(), lr=LR))  # fmt: skip
    straight = _lightning_train(tmp_path / "remote", remote)
    _assert_same(straight, local)
    # Resume from the checkpoint Lightning wrote after the first epoch's last step (step 6).
    checkpoint = str(tmp_path / "remote" / f"epoch=0-step={STEPS // 2}.ckpt")
    resumed = _lightning_train(tmp_path / "remote", remote, seed=7, resume=checkpoint)
    _assert_same(resumed, straight)

"""ProbeCallback with a real Lightning Trainer on CPU: a tiny binary MLP on digits, Bop + Adam in a CaseOptimizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

import bnn_probe  # noqa: E402
from bnn_probe.data import load_digits  # noqa: E402
from bnn_probe.errors import BnnProbeError  # noqa: E402
from bnn_probe.integrations.lightning import ProbeCallback, select_optimizer  # noqa: E402
from bnn_probe.models import BinaryMLP  # noqa: E402
from bnn_probe.nn import binary_parameters  # noqa: E402
from bnn_probe.optim import Bop, binary_init_, bnn_optimizer  # noqa: E402


class Module(pl.LightningModule):
    def __init__(self, fail_at: int = 0, two_optimizers: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = BinaryMLP(64, [32], 10)
        binary_init_(self.net, seed=0)
        if two_optimizers:
            self.automatic_optimization = False

    def training_step(self, batch, i):
        x, y = batch
        if self.hparams.fail_at and self.global_step + 1 >= self.hparams.fail_at:
            raise RuntimeError("planted failure")
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        if self.hparams.two_optimizers:
            for opt in self.optimizers():
                opt.zero_grad()
            self.manual_backward(loss)
            for opt in self.optimizers():
                opt.step()
            return None
        return loss

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        if self.hparams.two_optimizers:
            ids = {id(p) for p in binary_parameters(self.net)}
            return [torch.optim.Adam([p for p in self.parameters() if id(p) not in ids], lr=1e-2),
                    Bop(binary_parameters(self.net), gamma=1e-2, threshold=1e-6)]
        return bnn_optimizer(self.net, gamma=1e-2, threshold=1e-6)


def _loaders():
    d = load_digits()
    tr = torch.utils.data.TensorDataset(d.x_train[:256], d.y_train[:256])
    va = torch.utils.data.TensorDataset(d.x_val[:64], d.y_val[:64])
    return (torch.utils.data.DataLoader(tr, batch_size=32, shuffle=False),
            torch.utils.data.DataLoader(va, batch_size=64))


def _trainer(tmp_path, cb, **kw):
    opts = dict(max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                logger=pl.loggers.CSVLogger(tmp_path / "lightning_logs"), enable_checkpointing=False,
                num_sanity_val_steps=0)
    opts.update(kw)
    return pl.Trainer(callbacks=[cb], **opts)


def test_fit_logs_run_and_leaves_lightning_logger_alone(tmp_path):
    cb = ProbeCallback(tmp_path / "run", hist_every=4, tag="lit")
    model = Module()
    tr, va = _loaders()
    _trainer(tmp_path, cb, max_epochs=2).fit(model, tr, va)
    run = bnn_probe.load_run(tmp_path / "run")
    assert run.status == "finished"
    assert sorted(run.steps["step"].unique()) == list(range(1, 17))  # 8 batches x 2 epochs
    assert set(run.steps["layer"]) == {"net.fc1.weight", "net.fc2.weight"}
    assert run.steps["flips"].sum() > 0
    assert run.meta["config"]["framework"] == "lightning" and run.meta["tag"] == "lit"
    assert run.meta["family"] == "bop"
    # the module's self.log metrics reached the run's train table once per epoch
    assert run.train["val_acc"].notna().sum() == 2 and run.train["train_loss"].notna().sum() == 2
    # Lightning's own logger still got its metrics, in its own folder; the probe wrote nothing there
    csvs = list((tmp_path / "lightning_logs").rglob("metrics.csv"))
    assert csvs and "val_acc" in csvs[0].read_text()
    assert not any((tmp_path / "lightning_logs").rglob("*.parquet"))


def test_second_fit_continues_the_run(tmp_path):
    cb = ProbeCallback(tmp_path / "run", hist_every=0, tensorboard=False)
    model = Module()
    tr, va = _loaders()
    _trainer(tmp_path, cb).fit(model, tr, va)
    counts_after_first = cb.probe.state_dict()["layers"]["net.fc1.weight"]["count"].clone()
    _trainer(tmp_path, cb).fit(model, tr, va)  # a new Trainer, same callback: the run goes on
    assert cb.fits == 2 and cb.probe.step == 16
    run = bnn_probe.load_run(tmp_path / "run")
    assert run.status == "finished"
    assert sorted(run.steps["step"].unique()) == list(range(1, 17))
    counts = cb.probe.state_dict()["layers"]["net.fc1.weight"]["count"]
    later = run.steps[(run.steps.layer == "net.fc1.weight") & (run.steps.step > 8)]["flips"].sum()
    assert int(counts.sum()) == int(counts_after_first.sum()) + int(later)  # per-weight counters survived


def test_failure_marks_run_failed(tmp_path):
    cb = ProbeCallback(tmp_path / "run", tensorboard=False)
    tr, va = _loaders()
    with pytest.raises(RuntimeError, match="planted"):
        _trainer(tmp_path, cb).fit(Module(fail_at=4), tr, va)
    run = bnn_probe.load_run(tmp_path / "run")
    assert run.status == "failed"
    assert run.steps["step"].max() == 3


def test_picks_the_optimizer_of_the_binary_weights(tmp_path):
    cb = ProbeCallback(tmp_path / "run", tensorboard=False)
    tr, va = _loaders()
    _trainer(tmp_path, cb).fit(Module(two_optimizers=True), tr, va)
    assert isinstance(cb.probe.optimizer, Bop)
    run = bnn_probe.load_run(tmp_path / "run")
    assert run.meta["family"] == "bop" and run.steps["step"].max() == 8
    m = Module()
    with pytest.raises(BnnProbeError, match="none of the Trainer's 1 optimizers|not stepped"):
        select_optimizer(m, [torch.optim.Adam([next(m.net.bn1.parameters())], lr=1e-2)])


def test_lightning_checkpoint_resume(tmp_path):
    """Stop after 1 epoch with a checkpoint, resume with ckpt_path and a fresh callback: same run, steps 1..16."""
    tr, va = _loaders()
    cb = ProbeCallback(tmp_path / "run", tensorboard=False)
    t1 = _trainer(tmp_path, cb)
    t1.fit(Module(), tr, va)
    t1.save_checkpoint(tmp_path / "e1.ckpt")
    cb2 = ProbeCallback(tmp_path / "run", tensorboard=False)
    _trainer(tmp_path, cb2, max_epochs=2).fit(Module(), tr, va, ckpt_path=tmp_path / "e1.ckpt")
    assert cb2.probe.step == 16
    run = bnn_probe.load_run(tmp_path / "run")
    assert run.status == "finished"
    assert sorted(run.steps["step"].unique()) == list(range(1, 17))
    assert not run.steps.duplicated(["step", "layer"]).any()

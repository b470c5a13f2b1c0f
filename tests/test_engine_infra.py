"""Distributed setup, the gathered image-text loss, SGD/schedule/clipping, checkpoints, SIGTERM."""

from __future__ import annotations

import os
import random
import signal
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from rclip_cli._torchrun import free_port, launch_torchrun, torchrun_command
from rclip_core.dist import (
    DistInfo,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    is_main,
    launched_by_torchrun,
    main_process_first,
)
from rclip_core.engine import checkpoint as ckpt_mod
from rclip_core.engine.checkpoint import (
    install_sigterm_handler,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    restore_rng,
    restore_training_state,
    save_checkpoint,
)
from rclip_core.engine.optim import (
    WarmupMultiStepLR,
    build_sgd,
    clip_grad_per_parameter,
    warmup_multistep_factor,
)
from rclip_core.errors import InputError
from rclip_core.losses import image_text_contrastive

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------- distributed

def test_single_process_is_a_noop(monkeypatch):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    info = init_distributed(device="cpu")
    assert info == DistInfo(device=torch.device("cpu"))
    assert not info.distributed and info.is_main and is_main()
    barrier()
    x = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(all_reduce_mean(x), x)
    assert all_reduce_mean({"a": 2.0, "b": torch.tensor(3.0)}) == {"a": 2.0, "b": 3.0}
    assert not launched_by_torchrun({})
    assert launched_by_torchrun({"LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    with main_process_first() as first:
        assert first
    cleanup()


# Per-rank batches of different size: rank 1 has one more row, which the gather cuts off.
def _itc_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    n = 3 + rank
    return torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)


def _gloo_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    try:
        img, txt = _itc_batch(rank)
        img.requires_grad_(True)
        txt.requires_grad_(True)
        loss = image_text_contrastive(img, txt, temperature=0.05)
        loss.backward()
        mean_t = all_reduce_mean(torch.tensor([float(rank), 10.0 * rank]))
        mean_d = all_reduce_mean({"loss": float(rank) + 1.0})
        marker = os.path.join(out_dir, "main_first.txt")
        with main_process_first() as first:
            # the main process runs the block first; the others find what it wrote
            seen = os.path.exists(marker)
            if first:
                open(marker, "w").write("0")
        barrier()
        torch.save({"info": (info.rank, info.world_size, info.local_rank, info.backend, is_main()),
                    "first": (first, seen), "loss": loss.detach(), "img_grad": img.grad,
                    "txt_grad": txt.grad, "mean_t": mean_t, "mean_d": mean_d}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup()


def test_gathered_image_text_loss_equals_global_batch(tmp_path):
    world = 2
    # fork: seconds faster than spawn on a busy 2-core machine; the workers pin 1 thread and
    # use tensors far below the size where intra-op threads start
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_gloo_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True,
                       start_method=method)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    assert [r["info"] for r in res] == [(0, 2, 0, "gloo", True), (1, 2, 1, "gloo", False)]
    assert [r["first"] for r in res] == [(True, False), (False, True)]
    for r in res:
        torch.testing.assert_close(r["mean_t"], torch.tensor([0.5, 5.0]))
        assert r["mean_d"] == {"loss": 1.5}

    # one process holding the global batch: both ranks cut to the smallest batch (3 rows)
    batches = [_itc_batch(r) for r in range(world)]
    img = torch.cat([b[0][:3] for b in batches]).requires_grad_(True)
    txt = torch.cat([b[1][:3] for b in batches]).requires_grad_(True)
    single = image_text_contrastive(img, txt, temperature=0.05, gather=False)
    single.backward()
    for rank, r in enumerate(res):
        torch.testing.assert_close(r["loss"], single.detach())  # every rank: the full 6 x 6 loss
        # all_gather's backward sums the identical per-rank losses' gradients: world x the
        # global gradient, which DDP's averaging turns back into exactly the global gradient
        torch.testing.assert_close(r["img_grad"][:3] / world, img.grad[3 * rank:3 * rank + 3])
        torch.testing.assert_close(r["txt_grad"][:3] / world, txt.grad[3 * rank:3 * rank + 3])
    assert torch.count_nonzero(res[1]["img_grad"][3]) == 0  # the row cut off gets no gradient


def test_torchrun_command_line():
    cmd = torchrun_command(4, ["pretrain", "r.yaml"], ["--max_restarts", "0"], port=29511)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4"
    assert cmd[cmd.index("--rdzv_endpoint") + 1] == "127.0.0.1:29511"
    assert cmd[cmd.index("-m", 3):] == ["-m", "rclip_cli", "pretrain", "r.yaml"]
    assert cmd.index("--max_restarts") < cmd.index("-m", 3)
    with pytest.raises(InputError):
        torchrun_command(0, [])


@pytest.mark.slow
def test_launch_torchrun_two_workers(tmp_path):
    (tmp_path / "rclip_probe_worker.py").write_text(textwrap.dedent("""
        import os, sys
        if sys.argv[2] == "fail":  # rank 1 fails at once; torchrun must report it
            sys.exit(3 if os.environ["RANK"] == "1" else 0)
        import torch
        from rclip_core.dist import init_distributed, all_reduce_mean, cleanup
        info = init_distributed(device="cpu")
        m = all_reduce_mean(torch.tensor([float(info.rank)]))
        open(sys.argv[1] + f"/rank{info.rank}.txt", "w").write(f"{info.world_size} {info.backend} {m.item()}")
        cleanup()
    """))
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    code = launch_torchrun(2, [str(tmp_path), "ok"], module="rclip_probe_worker", env=env)
    assert code == 0
    assert (tmp_path / "rank0.txt").read_text() == "2 gloo 0.5"
    assert (tmp_path / "rank1.txt").read_text() == "2 gloo 0.5"
    assert launch_torchrun(2, [str(tmp_path), "fail"], ["--max_restarts", "0"],
                           module="rclip_probe_worker", env=env) != 0


# ----------------------------------------------------------------------------- optimiser

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.ln = nn.LayerNorm(3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.tied = self.conv  # shared module: parameters must appear once


def test_build_sgd_groups():
    net = _Net()
    opt = build_sgd(net, lr=0.002)
    decay, no_decay = opt.param_groups
    assert {id(p) for p in decay["params"]} == {id(net.conv.weight), id(net.conv.bias)}
    norm_params = [*net.bn.parameters(), *net.ln.parameters()]
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in norm_params}
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert decay["momentum"] == 0.9 and decay["lr"] == 0.002 and not decay["nesterov"]
    (only,) = build_sgd(net, lr=0.1, no_decay_norms=False).param_groups
    assert len(only["params"]) == 6 and only["weight_decay"] == 1e-4
    (plain,) = build_sgd([net.conv.weight, net.frozen.weight], lr=0.1).param_groups
    assert len(plain["params"]) == 1  # frozen parameters are left out


def test_warmup_multistep_values():
    # W = 1000, f = 0.001: factor(it) = 0.001 + 0.999 * it / 1000 for it < 1000
    f = lambda it: warmup_multistep_factor(it, [300_000, 525_000], 0.1, 1000, 0.001)  # noqa: E731
    assert f(0) == pytest.approx(0.001)
    assert f(500) == pytest.approx(0.5005)
    assert f(999) == pytest.approx(0.999001)
    assert f(1000) == 1.0 and f(299_999) == 1.0
    assert f(300_000) == pytest.approx(0.1)  # the drop happens AT the milestone (bisect_right)
    assert f(524_999) == pytest.approx(0.1)
    assert f(525_000) == pytest.approx(0.01)


def test_warmup_multistep_scheduler_and_state_dict():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.002)
    sched = WarmupMultiStepLR(opt, milestones=[6, 8], warmup_iters=4)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # it 0..3: 0.002 * (0.001 + 0.999 * it / 4); 4,5: 0.002; 6,7: 0.0002; 8,9: 0.00002
    expect = [0.002 * (0.001 + 0.999 * i / 4) for i in range(4)] + [0.002] * 2 + [0.0002] * 2 + [0.00002] * 2
    assert lrs == pytest.approx(expect, rel=1e-9)
    # resume: a fresh scheduler loaded from the state continues the same way
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.002)
    sched2 = WarmupMultiStepLR(opt2, milestones=[6, 8], warmup_iters=4)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 10 and sched2.get_last_lr() == pytest.approx([0.00002])
    with pytest.raises(ValueError):
        WarmupMultiStepLR(opt, milestones=[8, 6])


def test_clip_per_parameter_vs_global():
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0])  # norm 5 -> stays (coefficient 5 / (5 + 1e-6), clamped to 1)
    b.grad = torch.tensor([6.0, 8.0])  # norm 10 -> halved to norm 5
    norms = clip_grad_per_parameter([a, b], max_norm=5.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 10.0]))
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(b.grad, torch.tensor([3.0, 4.0]), rtol=1e-6, atol=1e-6)
    # the global clipper scales BOTH by 5 / sqrt(125): a different result
    a2, b2 = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    a2.grad, b2.grad = torch.tensor([3.0, 4.0]), torch.tensor([6.0, 8.0])
    torch.nn.utils.clip_grad_norm_([a2, b2], 5.0)
    assert a2.grad.norm().item() == pytest.approx(5.0 * 5.0 / 125 ** 0.5, rel=1e-5)
    assert not torch.allclose(a2.grad, a.grad)


def test_clip_per_parameter_matches_a_loop_of_clip_grad_norm():
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.zeros(s)) for s in [(3, 4), (7,), (2, 2, 2), (5,)]]
    grads = [torch.randn(p.shape, generator=g) * s for p, s in zip(params, [0.1, 3.0, 10.0, 1.0])]
    ref = [nn.Parameter(torch.zeros(p.shape)) for p in params]
    for p, r, gr in zip(params, ref, grads):
        p.grad, r.grad = gr.clone(), gr.clone()
    for r in ref:
        torch.nn.utils.clip_grad_norm_(r, 2.0)
    clip_grad_per_parameter(params + [nn.Parameter(torch.zeros(1))], max_norm=2.0)  # no-grad param skipped
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad)


# ----------------------------------------------------------------------------- checkpoints

def _training_bits():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = build_sgd(model, lr=0.1)
    sched = WarmupMultiStepLR(opt, milestones=[5], warmup_iters=2)
    for _ in range(3):
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def _draw():
    return (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist())


def test_checkpoint_round_trip_with_rng(tmp_path):
    model, opt, sched = _training_bits()
    random.seed(1)
    np.random.seed(2)
    np.random.randn()  # leaves a cached gaussian in NumPy's legacy state
    torch.manual_seed(3)
    path = save_checkpoint(tmp_path, 3, model.state_dict(), opt, sched,
                           extra={"sampler": {"epoch": 1, "index": torch.tensor(17)}, "note": "x"})
    after_save = _draw()
    assert path == tmp_path / "ckpt_00000003"
    assert (tmp_path / "latest").read_text().strip() == "ckpt_00000003"
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "state.pt"]
    torch.load(path / "state.pt", weights_only=True)  # plain types only

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    model2 = nn.Linear(3, 2)
    opt2 = build_sgd(model2, lr=0.1)
    sched2 = WarmupMultiStepLR(opt2, milestones=[5], warmup_iters=2)
    ck = load_latest(tmp_path)
    assert ck is not None and ck.step == 3
    model2.load_state_dict(ck.model_state)
    assert restore_training_state(ck, opt2, sched2) == 3
    assert _draw() == after_save  # the RNG continues exactly where it was at save time
    for k, v in model.state_dict().items():
        torch.testing.assert_close(model2.state_dict()[k], v)
    assert sched2.last_epoch == sched.last_epoch and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    mom = opt.state[model.weight]["momentum_buffer"]
    torch.testing.assert_close(opt2.state[model2.weight]["momentum_buffer"], mom)
    assert ck.extra["sampler"]["epoch"] == 1 and int(ck.extra["sampler"]["index"]) == 17
    restore_rng(ck.state)  # also accepts the whole state dict
    assert _draw() == after_save


def test_checkpoint_failure_mid_write_keeps_previous(tmp_path, monkeypatch):
    model, opt, sched = _training_bits()
    save_checkpoint(tmp_path, 10, model.state_dict(), opt, sched)

    def broken_save(*a, **k):  # model.safetensors is already written when state.pt fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(Exception, match="No space left"):
        save_checkpoint(tmp_path, 20, model.state_dict(), opt, sched)
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == "ckpt_00000010"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000010", "latest"]  # no temp dir left
    assert load_latest(tmp_path).step == 10


def test_checkpoint_keep_last_and_fallbacks(tmp_path):
    assert load_latest(tmp_path / "nothing") is None
    assert load_latest(tmp_path) is None
    model, opt, sched = _training_bits()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model.state_dict(), opt, sched, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    # a stale pointer (crash between rename and pointer update) falls back to the newest
    (tmp_path / "latest").write_text("ckpt_00000099\n")
    assert load_latest(tmp_path).step == 4
    (tmp_path / "latest").unlink()
    assert load_latest(tmp_path).step == 4
    # re-saving the same step replaces it
    save_checkpoint(tmp_path, 4, {"w": torch.ones(2)}, rng=False)
    torch.testing.assert_close(load_checkpoint(tmp_path / "ckpt_00000004").model_state["w"], torch.ones(2))


def test_checkpoint_refuses_unloadable_extra_before_writing(tmp_path):
    with pytest.raises(TypeError, match="state.extra.sampler"):
        save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, extra={"sampler": object()})
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_checkpoint_shared_and_view_tensors(tmp_path):
    base = torch.arange(6.0)
    state = {"a": base, "b": base, "view": base[2:4], "t": base.view(2, 3).t()}
    save_checkpoint(tmp_path, 1, state, rng=False)
    got = load_latest(tmp_path).model_state
    torch.testing.assert_close(got["b"], base)
    torch.testing.assert_close(got["view"], torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(got["t"], base.view(2, 3).t())


def test_corrupt_checkpoint_is_an_input_error(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, rng=False)
    (tmp_path / "ckpt_00000001" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="unreadable"):
        load_latest(tmp_path)


def test_sigterm_sets_the_stop_flag():
    before = signal.getsignal(signal.SIGTERM)
    flag = install_sigterm_handler()
    try:
        assert not flag
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.is_set() and flag.signum == signal.SIGTERM
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before


def test_trim_metrics_log_keeps_steps_up_to_the_checkpoint(tmp_path):
    """Shared by pretraining and fine-tuning: a resumed run drops the log lines of the steps it
    runs again (and unreadable lines); a fresh run starts without the old log."""
    from rclip_core.engine.checkpoint import trim_metrics_log

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2, "eval": {}}\nnot json\n{"step": 3}\n[1]\n{"no_step": 0}\n')
    trim_metrics_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2, "eval": {}}\n{"no_step": 0}\n'
    trim_metrics_log(log, 0)
    assert not log.exists()
    trim_metrics_log(tmp_path / "missing.jsonl", 3)  # nothing to trim
    assert not (tmp_path / "missing.jsonl").exists()

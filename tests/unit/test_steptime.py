"""The step-time model's parts: the operator log, the rates' timing, the sum, the data sheets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from lorabench.measure import rates, steptime
from lorabench.measure.operators import Meta, Op, OpLog
from lorabench.plan import accelerators

CPU = torch.device("cpu")


def _logged(fn) -> dict[str, list[tuple[Op, int]]]:
    """{operator name: [(op, count)]} of `fn()` run on fake tensors."""
    log = OpLog()
    with FakeTensorMode(allow_non_fake_inputs=True):
        with log:
            fn()
    out: dict[str, list] = {}
    for op, n in log.ops.items():
        out.setdefault(op.name, []).append((op, n))
    return out


def test_a_product_is_logged_with_its_flops_bytes_and_signature():
    def fn():
        a, b = torch.empty(64, 32), torch.empty(32, 16)
        torch.mm(a, b)

    ((op, n),) = _logged(fn)["aten.mm.default"]
    assert (op.kind, n, op.flops) == ("matmul", 1, 2 * 64 * 32 * 16)
    assert op.bytes == 4 * (64 * 32 + 32 * 16 + 64 * 16)
    assert op.fresh == (4 * 64 * 16,)
    args, _ = op.signature
    assert args[0] == Meta((64, 32), (32, 1), torch.float32)


def test_views_move_nothing_in_place_ops_write_their_argument_and_prim_queries_are_not_operators():
    def fn():
        x = torch.empty(8, 4)
        x.t()
        x.view(32)
        x.add_(1.0)
        x.device  # prim.device under a dispatch mode: no kernel in a real step

    logged = _logged(fn)
    assert {op.kind for op, _ in logged["aten.t.default"] + logged["aten.view.default"]} == {"dispatch"}
    ((add, _),) = logged["aten.add_.Tensor"] if "aten.add_.Tensor" in logged else logged["aten.add_.Scalar"]
    assert add.in_place and add.fresh == () and add.elements == 32 and add.bytes == 2 * 32 * 4
    assert not any(name.startswith("prim.") for name in logged)


def test_a_training_step_is_logged_by_phase():
    model = nn.Linear(16, 8)

    log = OpLog()
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = nn.Linear(16, 8)
        opt = torch.optim.Adam(fake.parameters(), foreach=True)
        x = torch.empty(4, 16)
        with log:
            log.phase = "forward"
            loss = fake(x).sum()
            log.phase = "backward"
            loss.backward()
            log.phase = "optimizer"
            opt.step()
    phases = {op.phase for op in log.ops}
    assert phases == {"forward", "backward", "optimizer"}
    assert any(op.kind == "matmul" for op in log.ops if op.phase == "backward")  # the weight's gradient
    del model


def _rates(**changes) -> rates.Rates:
    base = rates.Rates(
        device="test",
        source="made by a test",
        matmul_flops={"float32": 1e9},
        bandwidth_bytes_s=1e9,
        in_place_bytes_s=2e9,
        random_per_s=1e6,
        first_touch_bytes_s=1e9,
        op_s={"forward": 1e-5, "backward": 1e-5, "optimizer": 0.0, "optimizer_step": 1e-4},
        tensor_s=1e-6,
        asynchronous=False,
    )
    return dataclasses.replace(base, **changes)


def _op(**fields) -> Op:
    base = dict(name="aten.add.Tensor", phase="forward", kind="memory", flops=0.0, bytes=0)
    return Op(**{**base, **fields})


def test_the_step_is_the_host_plus_the_device_on_a_cpu_and_the_longer_on_a_gpu():
    ops = [
        (_op(name="aten.mm.default", kind="matmul", flops=2e9, bytes=10), 1.0),  # 2 s of FLOPs at 1e9
        (_op(bytes=10**9), 2.0),  # 1 s each out of place
        (_op(name="aten.mul_.Tensor", bytes=10**9, in_place=True), 1.0),  # 0.5 s in place
        (_op(name="aten.view.default", kind="dispatch"), 100.0),  # host only
    ]
    host = 104 * 1e-5 + 1e-4 + 3 * 1e-6
    cpu = steptime.predict(ops, _rates(), trained_tensors=3)
    assert cpu.parts["products"] == pytest.approx(2.0)
    assert cpu.parts["memory"] == pytest.approx(2.5)
    assert cpu.parts["host"] == pytest.approx(host)
    assert cpu.seconds == pytest.approx(4.5 + host)
    gpu = steptime.predict(ops, _rates(asynchronous=True, first_touch_bytes_s=None), trained_tensors=3)
    assert gpu.seconds == pytest.approx(4.5)  # the kernels hide the host's launches
    launch_bound = steptime.predict(ops, _rates(asynchronous=True, op_s={"forward": 1.0}), trained_tensors=0)
    assert launch_bound.seconds == pytest.approx(104.0)


def test_a_timed_kernel_wins_over_the_roofline_and_random_draws_and_first_touch_add_on_a_cpu():
    product = _op(name="aten.mm.default", kind="matmul", flops=2e9, bytes=10, signature=((), ()))
    timed = _rates(timed_s={rates.key(product): 0.25})
    assert steptime.predict([(product, 1.0)], timed, 0).parts["products"] == 0.25
    draw = _op(name="aten.bernoulli_.float", bytes=8, elements=10**6, in_place=True)
    assert steptime.predict([(draw, 1.0)], _rates(), 0).parts["random"] == pytest.approx(1.0)
    small, large = 2**20, rates.FRESH_MIN_BYTES
    made = _op(bytes=10, fresh=(small, large))
    assert steptime.predict([(made, 1.0)], _rates(), 0).parts["first_touch"] == pytest.approx(large / 1e9)
    on_gpu = _rates(first_touch_bytes_s=None)
    assert steptime.predict([(made, 1.0)], on_gpu, 0).parts["first_touch"] == 0.0


def test_the_forward_alone_is_what_an_evaluation_costs():
    ops = [(_op(bytes=10**9), 1.0), (_op(phase="backward", bytes=10**9), 1.0)]
    step = steptime.predict(ops, _rates(op_s={}), 0)
    assert step.forward_s == pytest.approx(1.0) and step.seconds == pytest.approx(2.0)


def _product(m: int, k: int, n: int) -> Op:
    def fn():
        torch.mm(torch.empty(m, k), torch.empty(k, n))

    return _logged(fn)["aten.mm.default"][0][0]


def test_a_large_product_is_timed_shrunk_along_its_largest_side_and_scaled_back():
    op = _product(4096, 512, 32000)
    args, _, scale = rates._shrunk(op, limit=op.flops / 8, bytes_limit=float("inf"))
    a, b = args
    assert scale == 8
    assert a.shape == (4096, 512) and b.shape == (512, 4000)  # N, the largest side, halved three times
    assert 2 * a.shape[0] * a.shape[1] * b.shape[1] * scale == op.flops


def test_an_optimizer_update_is_timed_on_its_first_tensors_and_scaled_by_its_bytes():
    def fn():
        params = [torch.empty(1024) for _ in range(8)]
        torch._foreach_add_(params, [torch.empty(1024) for _ in range(8)])

    op = _logged(fn)["aten._foreach_add_.List"][0][0]
    args, _, scale = rates._shrunk(op, limit=float("inf"), bytes_limit=2 * 2 * 4096)
    assert len(args[0]) == len(args[1]) == 2 and scale == pytest.approx(4.0)


def test_a_kernel_is_timed_on_this_cpu_and_a_larger_product_takes_longer():
    small, large = rates.time_op(_product(64, 64, 64), CPU), rates.time_op(_product(512, 512, 512), CPU)
    assert 0 < small < large


def test_an_operator_that_cannot_run_from_its_signature_is_not_timed():
    broken = _op(
        name="aten.mm.default",
        kind="matmul",
        flops=1.0,
        signature=((Meta((2, 3), (3, 1), torch.float32),), ()),
    )
    assert rates.time_op(broken, CPU) is None


def test_rates_survive_their_json_record():
    r = _rates(timed_s={"abc": 1.0})
    assert rates.Rates.from_dict(r.to_dict()) == r


@pytest.mark.parametrize(
    "device_name, target",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA A100 80GB PCIe", "a100-80gb"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("AMD Instinct MI300X", "mi300x"),
        ("AMD Instinct MI250X/MI250", "mi250x"),
    ],
)
def test_each_accelerator_matches_the_name_torch_gives_it_and_no_other(device_name, target):
    matched = [name for name, a in accelerators.ACCELERATORS.items() if a.matches(device_name)]
    assert matched == [target]


def test_a_data_sheet_says_it_is_not_calibrated_and_adds_a_launch_to_the_hosts_dispatch():
    h100 = accelerators.find("H100")
    r = h100.rates({"forward": 1e-5, "optimizer_step": 1e-4}, 1e-6)
    assert "not calibrated" in r.source and r.asynchronous and r.first_touch_bytes_s is None
    assert r.matmul_flops["bfloat16"] == pytest.approx(989.4e12)
    assert r.op_s["forward"] == pytest.approx(1e-5 + accelerators.LAUNCH_S)
    assert r.op_s["optimizer_step"] == pytest.approx(1e-4)
    with pytest.raises(KeyError):
        accelerators.find("tpu-v5")

"""Deterministic mode and numerical safety (fp16/bf16 inputs accumulate in fp32)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from tiny_models import (
    block_net,
    ce_loss,
    vector_batches,
)

import tunecomp_kernels
from tunecomp_kernels import MaskedLowRankLinear, masked_lowrank_linear
from tunecomp_kernels.compress import TuneCompConfig, prepare, train
from tunecomp_kernels.ops import backends
from tunecomp_kernels.ops.backends import BackendSpec, backend_serves, known_backends

RUNNABLE = [n for n in known_backends()
            if backends.unavailable_reason(n) is None and backend_serves(n, "cpu")]


@pytest.fixture
def restore_flags():
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:4]
    if before[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = before[4]


# --- the switch ----------------------------------------------------------------------------


def test_context_manager_sets_and_restores(restore_flags):
    assert not tunecomp_kernels.is_deterministic()
    with tunecomp_kernels.deterministic() as mode:
        assert tunecomp_kernels.is_deterministic()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"]
        assert "enabled=True" in repr(mode)
        with tunecomp_kernels.deterministic(False):
            assert not tunecomp_kernels.is_deterministic()
        assert tunecomp_kernels.is_deterministic()
    assert not tunecomp_kernels.is_deterministic()


def test_plain_call_stays_on_and_seeds(restore_flags):
    tunecomp_kernels.deterministic(seed=7)
    assert tunecomp_kernels.is_deterministic()
    draws = (torch.rand(2), random.random(), np.random.rand())
    tunecomp_kernels.seed_everything(7)
    assert torch.equal(draws[0], torch.rand(2)) and draws[1] == random.random()
    assert draws[2] == np.random.rand()
    tunecomp_kernels.deterministic(False)
    assert not tunecomp_kernels.is_deterministic()


@pytest.mark.parametrize(("kwargs", "exc", "message"), [
    ({"enabled": "yes"}, TypeError, "enabled must be a bool, got str"),
    ({"warn_only": 1}, TypeError, "warn_only must be a bool, got int"),
    ({"seed": -1}, ValueError, r"seed must be in \[0, 2\*\*32\), got -1"),
    ({"seed": 1.5}, TypeError, "seed must be an int, got float"),
])
def test_bad_arguments(restore_flags, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        tunecomp_kernels.deterministic(**kwargs)
    assert not tunecomp_kernels.is_deterministic()


@pytest.fixture
def atomic_backend():
    """A registered backend that is faster than "torch" but not deterministic."""
    spec = BackendSpec("fake_atomic", "tunecomp_kernels.ops.reference_op", lambda: (), (),
                       100, lambda: None, deterministic=False)
    backends.register_backend(spec)
    yield spec.name
    del backends._REGISTRY[spec.name]


def test_auto_avoids_nondeterministic_backends(restore_flags, atomic_backend):
    assert backends.resolve_backend("auto", "cpu") == atomic_backend
    assert backends.resolve_backend(atomic_backend, "cpu") == atomic_backend
    with tunecomp_kernels.deterministic():
        assert backends.resolve_backend("auto", "cpu") == "torch"
        with pytest.raises(RuntimeError, match="'fake_atomic' is nondeterministic"):
            backends.resolve_backend(atomic_backend, "cpu")
    with tunecomp_kernels.deterministic(warn_only=True), \
            pytest.warns(UserWarning, match="nondeterministic"):
        assert backends.resolve_backend(atomic_backend, "cpu") == atomic_backend


def test_triton_is_flagged_nondeterministic():
    assert not backends._REGISTRY["triton"].deterministic  # atomics in its reductions
    assert backends._REGISTRY["torch"].deterministic


def training_run():
    """A short run with dropout-like noise from every RNG, under deterministic mode."""
    with tunecomp_kernels.deterministic(seed=0):
        model = block_net()
        controller = prepare(model, TuneCompConfig(target_ratio=0.4, blend_steps=3,
                                                   total_steps=6, l1_lambda=1e-2),
                             forward=lambda m, b: m(b[0]))

        def forward(m, batch):
            x = torch.nn.functional.dropout(batch[0], 0.2, training=True)
            return m(x * (1 + 0.01 * random.random() + 0.01 * float(np.random.rand())))

        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        history = train(model, optimizer, vector_batches(3), controller=controller,
                        forward=forward, loss_fn=ce_loss)
        return model.state_dict(), history.losses, controller.alive_masks()


def test_training_runs_are_bit_identical(restore_flags):
    state_a, losses_a, alive_a = training_run()
    torch.manual_seed(123)
    random.seed(5)  # whatever ran before does not matter
    state_b, losses_b, alive_b = training_run()
    assert losses_a == losses_b
    assert all(torch.equal(v, state_b[k]) for k, v in state_a.items())
    assert all(torch.equal(v, alive_b[k]) for k, v in alive_a.items())
    assert not tunecomp_kernels.is_deterministic()  # the context restored the flag


# --- numerical safety ----------------------------------------------------------------------


# the Triton interpreter computes bf16 tl.dot wrongly (docs/design.md#measuring)
@pytest.mark.parametrize("backend", [b for b in RUNNABLE if b != "triton"])
def test_bf16_sums_accumulate_in_fp32(backend):
    """4096 products of 1: a bf16 accumulator stalls at 256, fp32 reaches 4096 exactly;
    huge products (2^120) whose partial sums reach 2^127 cancel to a finite result."""
    x = torch.ones(2, 4096, dtype=torch.bfloat16)
    V = torch.ones(2, 4096, dtype=torch.bfloat16)
    U = torch.ones(3, 2, dtype=torch.bfloat16)
    y = masked_lowrank_linear(x, U, torch.ones(2, dtype=torch.bfloat16), V, backend=backend)
    assert torch.equal(y, torch.full_like(y, 2 * 4096.0))

    big = 2.0 ** 60
    x = torch.full((3, 256), big, dtype=torch.bfloat16)
    V = torch.full((2, 256), big, dtype=torch.bfloat16)
    V[:, 128:] = -big
    V[:, 0] = 1.5 * big  # t = 0.5 * 2^120 = 2^119
    U = torch.full((4, 2), 2.0 ** -100, dtype=torch.bfloat16)
    y = masked_lowrank_linear(x, U, torch.ones(2, dtype=torch.bfloat16), V, backend=backend)
    assert torch.isfinite(y).all()
    assert torch.equal(y, torch.full_like(y, 2 * 2.0 ** 19))


@pytest.mark.parametrize("backend", RUNNABLE)
def test_fp16_module_with_large_inputs_stays_finite(backend):
    """A half-precision layer on activations of 600: the partial sums pass fp16's 65504,
    the outputs and all gradients do not."""
    layer = MaskedLowRankLinear(256, 8, 4, dtype=torch.float16, backend=backend)
    with torch.no_grad():
        layer.V.fill_(1.0)
        layer.V[:, 128:] = -1.0
        layer.V[:, 0] = 1.5  # t = 300 per rank
        layer.U.fill_(0.25)
        layer.bias.zero_()
    x = torch.full((5, 256), 600.0, dtype=torch.float16, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, torch.full_like(y, 300.0))
    y.sum().backward()
    for name, grad in (("x", x.grad), ("U", layer.U.grad), ("mask", layer.mask.grad),
                       ("V", layer.V.grad), ("bias", layer.bias.grad)):
        assert torch.isfinite(grad).all(), name
    # dmask_i = Σ_N t·(dy·U) = 5 · 300 · 8 · 0.25 = 3000, fine in fp16
    assert torch.equal(layer.mask.grad, torch.full_like(layer.mask.grad, 3000.0))

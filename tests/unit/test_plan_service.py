"""The planner in the service (service/planning.py): `auto` layout fields in a spec, the layout chosen
for them on the live cluster at admission (and the event that says why), the memory check at submit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from parallel.config import ConfigError, build_config
from parallel.planner import ACCELERATORS, Cluster, search
from parallel.planner.search import kept_fields
from parallel.planner.timing import CPU_EFFICIENCY
from parallel.train import preflight
from service.planning import PlanInputError, at_submit, memory_refusal, resolve_auto, shaped
from service.states import EventKind, JobState
from service.store import Store
from service.supervisor import Supervisor
from tests.unit.test_supervisor import FakeGroup

GiB = 2**30
CPU_NODE = {"node-a": {"CPU": 4.0, "memory": 16.0 * GiB}}
GPU_NODES = {"gpu-a": {"CPU": 64.0, "GPU": 8.0}, "gpu-b": {"CPU": 64.0, "GPU": 8.0}, "head": {"CPU": 8.0}}
TINY = {"model": {"preset": "tiny"}, "train": {"global_batch": 8, "seq_len": 64}}


def _cfg(**sections: Any) -> Any:
    return build_config({**TINY, **sections})


# -- `auto` in a spec ------------------------------------------------------------------------------------------


def test_parallel_auto_leaves_every_layout_field_to_the_planner() -> None:
    cfg = _cfg(parallel="auto")
    assert cfg.plan.auto == ["dp", "tp", "pp", "cp", "zero", "dp_replicate", "ep", "pp_schedule",
                             "activation_checkpointing", "micro_batch"]  # fmt: skip
    assert cfg.train.micro_batch == 1  # a placeholder every global batch takes
    kept = build_config({**TINY, "parallel": "auto", "train": {**TINY["train"], "micro_batch": 4}})
    assert "micro_batch" not in kept.plan.auto and kept.train.micro_batch == 4  # given, so kept


def test_an_auto_axis_with_dp_unset_leaves_dp_too_and_keeps_the_rest() -> None:
    cfg = build_config({**TINY, "parallel": {"tp": "auto", "zero": 1}}, strict=True)
    assert cfg.plan.auto == ["dp", "tp"]
    assert kept_fields(cfg) == {"pp": 1, "cp": 1, "zero": 1, "dp_replicate": 1, "ep": 1, "pp_schedule": "1f1b",
                                "activation_checkpointing": "none", "micro_batch": 2}  # fmt: skip
    fixed_dp = _cfg(parallel={"tp": "auto", "dp": 2})
    assert fixed_dp.plan.auto == ["tp"] and kept_fields(fixed_dp)["dp"] == 2
    assert kept_fields(_cfg()) == {}  # nothing auto: `fourfold plan` ranks every layout


def test_a_search_keeps_the_fields_the_spec_fixes() -> None:
    cfg = _cfg(parallel={"tp": "auto", "dp": 2, "zero": 1})
    found = search(cfg, Cluster(1, 4, ACCELERATORS["h100-80gb"]), fixed=kept_fields(cfg), top=20, dominated=True)
    assert found and {(c.config.parallel.dp, c.config.parallel.tp, c.config.parallel.zero) for c in found} == {
        (2, 2, 1)
    }


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"plan": {"ranks": 4}}, "plan.ranks=4: goes with layout fields left to the planner"),
        ({"parallel": {"tp": "automatic"}}, "parallel.tp: Input should be a valid integer"),
        ({"parallel": "auto", "plan": {"auto": ["sp"]}}, "plan.auto.0: Input should be 'dp', 'tp'"),
        ({"parallel": "auto", "train": ["x"]}, "train: Input should be a valid dictionary"),
    ],
)
def test_bad_auto_specs_are_refused_naming_the_field(sections: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match="^" + expected.replace("(", r"\(").replace(".", r"\.")):
        build_config({**TINY, **sections})


def test_the_engine_alone_refuses_a_layout_left_to_the_planner() -> None:
    with pytest.raises(ConfigError, match=r"^plan\.auto: dp, tp left to the planner; the service chooses them"):
        preflight(_cfg(parallel={"tp": "auto"}))


# -- at admission: the layout chosen on the live cluster -----------------------------------------------------


def test_resolve_auto_picks_the_best_layout_that_fits_and_says_why() -> None:
    cfg = _cfg(parallel="auto", plan={"ranks": 4})
    chosen, message = resolve_auto(cfg, CPU_NODE)
    assert chosen.parallel.world_size == 4 and not chosen.plan.auto and chosen.plan.ranks is None
    assert chosen.train.global_batch == 8  # the spec's batch, never another
    best = search(cfg, Cluster(1, 4, chosen_accelerator(cfg)), efficiency=CPU_EFFICIENCY, top=1)[0]
    assert chosen.parallel == best.config.parallel and chosen.train.micro_batch == best.config.train.micro_batch
    assert message.startswith(f"planned {best.prediction.layout} for [dp, tp, pp, cp, zero, dp_replicate, ")
    assert "on 1x4xcpu: fits with " in message and "best predicted throughput" in message
    build_config(chosen.model_dump(mode="json", by_alias=True))  # what the store keeps is a valid spec


def chosen_accelerator(cfg: Any) -> Any:
    from service.planning import cpu_accelerator

    return cpu_accelerator(4, node_memory=int(CPU_NODE["node-a"]["memory"]))


def test_resolve_auto_on_gpus_needs_their_type_and_plans_whole_nodes() -> None:
    cfg = build_config({"model": {"preset": "8b"}, "parallel": "auto", "resources": {"accelerator": "gpu"},
                        "train": {"global_batch": 64, "seq_len": 4096}})  # fmt: skip
    with pytest.raises(PlanInputError, match=r"^plan\.accelerator: Ray does not say which GPU"):
        resolve_auto(cfg, GPU_NODES)
    chosen, message = resolve_auto(cfg, GPU_NODES, accelerator="h100")  # the service's FOURFOLD_ACCELERATOR
    assert chosen.parallel.world_size == 16 and chosen.parallel.tp <= 8  # every GPU, tp within a node
    assert " on 2x8xh100-80gb: " in message


def test_resolve_auto_refuses_when_nothing_fits() -> None:
    cfg = _cfg(model={"preset": "8b"}, parallel="auto", plan={"ranks": 2})
    with pytest.raises(PlanInputError, match=r"^plan\.auto \[dp, .*\]: no layout of 2 ranks on 1x2xcpu fits"):
        resolve_auto(cfg, CPU_NODE)
    with pytest.raises(PlanInputError, match=r"^plan\.ranks 9: the cluster has 4 slots"):
        resolve_auto(_cfg(parallel="auto", plan={"ranks": 9}), CPU_NODE)


def test_shaped_cuts_a_cluster_to_the_ranks() -> None:
    eight = Cluster(4, 8, ACCELERATORS["h100-80gb"])
    assert (shaped(eight, 16).nodes, shaped(eight, 16).per_node) == (2, 8)
    assert (shaped(eight, 6).nodes, shaped(eight, 6).per_node) == (1, 6)
    assert (shaped(eight, 12).nodes, shaped(eight, 12).per_node) == (2, 6)


# -- at submit -----------------------------------------------------------------------------------------------


def test_at_submit_refuses_a_layout_predicted_not_to_fit_with_its_breakdown() -> None:
    big = _cfg(model={"preset": "1b"})
    with pytest.raises(PlanInputError) as err:
        at_submit(big, CPU_NODE, None, 4096)
    text = str(err.value)
    assert text.startswith("parallel: dp1 tp1 pp1 cp1 zero0 ac:none mb2 needs ")
    assert "per rank at its " in text and "optimizer " in text and "set plan.memory_check: false" in text
    off = _cfg(model={"preset": "1b"}, plan={"memory_check": False})
    assert at_submit(off, CPU_NODE, None, 4096) == (off, ["planner: memory check off (plan.memory_check: false)"])
    small = _cfg()
    assert at_submit(small, CPU_NODE, None, 4096) == (small, []) and memory_refusal(small, shaped_cpu()) is None


def shaped_cpu() -> Cluster:
    from service.planning import cpu_accelerator

    return Cluster(1, 4, cpu_accelerator(4, node_memory=16 * GiB))


def test_at_submit_fills_the_ranks_of_an_auto_spec_and_names_what_it_cannot_check() -> None:
    cfg, notes = at_submit(_cfg(parallel="auto"), CPU_NODE, None, 4096)
    assert cfg.plan.ranks == 4 and notes == []
    assert at_submit(_cfg(parallel="auto"), CPU_NODE, None, 3)[0].plan.ranks == 3  # the service's limit
    gpu = _cfg(resources={"accelerator": "gpu"})
    _, notes = at_submit(gpu, GPU_NODES, None, 4096)
    assert notes and notes[0].startswith("planner: memory not checked at submit (plan.accelerator: Ray does not")
    with pytest.raises(PlanInputError, match=r"^plan\.accelerator z100: unknown accelerator 'z100'"):
        at_submit(_cfg(plan={"accelerator": "z100"}), GPU_NODES, None, 4096)


# -- the supervisor ------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path):
    s = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield s
    s.close()


def _supervisor(store: Store, resources: dict) -> Supervisor:
    FakeGroup.made = []
    return Supervisor(store, group_factory=FakeGroup, resources=lambda: resources, leftovers=lambda ids: 0)


def _submit(store: Store, cfg: Any) -> str:
    return store.create_job(cfg.model_dump(mode="json", by_alias=True), owner="local", name="job")[0].id


def test_the_supervisor_plans_an_auto_job_at_admission_and_runs_that_layout(store: Store) -> None:
    cfg, _ = at_submit(_cfg(parallel="auto"), CPU_NODE, None, 4096)
    job_id = _submit(store, cfg)
    sup = _supervisor(store, CPU_NODE)
    sup.tick()
    job = store.get_job(job_id)
    assert job is not None and job.state == JobState.STARTING and job.spec["plan"]["auto"] == []
    planned = [e for e in store.events(job_id) if e.kind == EventKind.PLAN]
    assert len(planned) == 1 and planned[0].message.startswith("planned dp")
    group = FakeGroup.made[-1]
    assert group.cfg.parallel.world_size == 4 and group.cfg.parallel == build_config(job.spec).parallel
    sup.tick()  # the group is launched with the planned spec, not the one submitted
    assert group.spec["plan"]["auto"] == [] and any(planned[0].message in line.line for line in store.logs(job_id))


def test_an_auto_job_that_no_layout_fits_fails_saying_why(store: Store) -> None:
    job_id = _submit(store, _cfg(model={"preset": "8b"}, parallel="auto", plan={"ranks": 4}))
    _supervisor(store, CPU_NODE).tick()
    job = store.get_job(job_id)
    assert job is not None and job.state == JobState.FAILED
    assert job.failure_reason is not None and job.failure_reason.startswith("planner: plan.auto [dp, ")
    assert "no layout of 4 ranks on 1x4xcpu fits" in job.failure_reason and not FakeGroup.made


def test_an_accelerator_without_a_peak_for_the_dtype_is_an_input_error_not_a_crash() -> None:
    from service.planning import predicted_run

    tpu = {"host": {"CPU": 8.0, "GPU": 4.0}}  # a GPU-like resource count; the spec names the chip
    cfg = _cfg(parallel="auto", resources={"accelerator": "gpu"}, plan={"accelerator": "tpu-v5p"},
               train={**TINY["train"], "dtype": "float32"})  # fmt: skip
    with pytest.raises(PlanInputError, match=r"^plan\.accelerator TPU v5p: TPU v5p has no fp32 peak"):
        resolve_auto(cfg, tpu)
    fixed = _cfg(resources={"accelerator": "gpu"}, plan={"accelerator": "tpu-v5p"},
                 train={**TINY["train"], "dtype": "float32"})  # fmt: skip
    with pytest.raises(PlanInputError, match=r"^plan\.accelerator TPU v5p: TPU v5p has no fp32 peak"):
        predicted_run(fixed, tpu)

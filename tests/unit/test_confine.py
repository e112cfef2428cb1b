"""Storage confinement (workers.confine): every path field, every trick, and the rank's second look."""

import os
from pathlib import Path

import pytest

from parallel.config import build_config, storage_fields
from workers.confine import Grant, Policy, StorageRefused, confine_spec, recheck


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    data_dir = tmp_path / "svc"
    p = {
        "data_dir": data_dir,
        "data": data_dir / "data",
        "ws": data_dir / "workspace",
        "outside": tmp_path / "outside",
    }
    for d in p.values():
        d.mkdir(parents=True, exist_ok=True)
    (p["data"] / "corpus.txt").write_text("hello world\n" * 10)
    (p["outside"] / "secret.txt").write_text("secret\n")
    (data_dir / "fourfold.db").write_text("the store")
    return p


def _policy(places: dict[str, Path], **kw) -> Policy:
    base = {
        "data_roots": (str(places["data"]),),
        "workspace": str(places["ws"]),
        "reserved": (str(places["data_dir"]),),
    }
    return Policy(**{**base, **kw})


def _spec(**sections) -> dict:
    spec = build_config({"model": {"preset": "tiny"}}).model_dump(mode="json", by_alias=True)
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        spec[section][key] = value
    return spec


def test_every_path_field_of_the_spec_is_marked() -> None:
    """The one list: a string field whose name says it holds a place must carry a storage marker."""
    marked = storage_fields()
    assert marked == {
        "model.init_from": {"storage": "read"},
        "data.path": {"storage": "read", "keywords": ["stdlib"]},
        "checkpoint.dir": {"storage": "write"},
        "checkpoint.resume": {"storage": "read", "keywords": ["auto"]},
    }
    from parallel.config import Config

    for section, info in Config.model_fields.items():
        for name, field in getattr(info.annotation, "model_fields", {}).items():
            if any(w in name for w in ("path", "dir", "file", "from", "resume", "url")):
                assert f"{section}.{field.alias or name}" in marked, f"{section}.{name} names a place but is not marked"


def test_defaults_read_data_and_corpora_write_only_the_job_dir(places) -> None:
    grant = _policy(places).grant("alice", "job1")
    job_dir = str(places["ws"] / "alice" / "job1")
    spec = confine_spec(_spec(data__source="text", data__path=str(places["data"] / "corpus.txt")), grant)
    assert spec["checkpoint"]["dir"] == job_dir  # the default: the job's own directory
    assert spec["data"]["path"] == str(places["data"] / "corpus.txt")
    assert confine_spec(_spec(data__source="text", data__path="stdlib"), grant)["data"]["path"] == "stdlib"
    assert confine_spec(_spec(checkpoint__dir="ckpt"), grant)["checkpoint"]["dir"] == f"{job_dir}/ckpt"
    none = confine_spec(_spec(), grant, default_dir=False)
    assert none["checkpoint"]["dir"] is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("data__path", "/etc/passwd", "data.path=/etc/passwd: outside this job's storage; it reads only under"),
        ("data__path", "{data}/../../outside/secret.txt", "outside this job's storage"),
        ("data__path", "~/.ssh/id_rsa", "outside this job's storage"),
        ("data__path", "../../../outside/secret.txt", "outside this job's storage"),  # relative: from the job dir
        ("data__path", "file://{outside}/secret.txt", "outside this job's storage"),
        ("data__path", "file://{data}/%2e%2e/x", "percent-encoding is not allowed in a file:// URL"),
        ("model__init_from", "{ws}/bob/job9/hf", "model.init_from={ws}/bob/job9/hf: outside this job's storage"),
        ("checkpoint__resume", "{ws}/bob/job9", "checkpoint.resume={ws}/bob/job9: outside"),
        (
            "checkpoint__dir",
            "{ws}/alice/other-job",
            "checkpoint.dir={ws}/alice/other-job: outside this job's storage; it writes only under",
        ),
        ("checkpoint__dir", "{data}/ckpt", "writes only under"),  # data roots are read-only
        ("checkpoint__dir", "/tmp/x", "writes only under"),
        ("data__path", "{data_dir}/fourfold.db", "outside this job's storage"),
        ("data__path", "s3://bucket/data", "outside this job's storage"),
        ("data__path", "simplecache::s3://bucket/data", "chained fsspec URLs"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
def test_paths_outside_the_grant_are_refused_naming_field_and_roots(places, field, value, message) -> None:
    fill = {k: str(v) for k, v in places.items()}
    grant = _policy(places).grant("alice", "job1")
    with pytest.raises(StorageRefused) as err:
        confine_spec(_spec(**{field: value.format(**fill)}), grant)
    assert message.format(**fill) in str(err.value)


def test_a_symlink_out_of_a_data_root_is_refused(places) -> None:
    link = places["data"] / "innocent.txt"
    link.symlink_to(places["outside"] / "secret.txt")
    grant = _policy(places).grant("alice", "job1")
    with pytest.raises(StorageRefused, match=r"resolves to .*outside/secret.txt\): outside this job's storage"):
        confine_spec(_spec(data__source="text", data__path=str(link)), grant)


def test_own_directory_readable_other_users_not_admin_reads_all(places) -> None:
    own_hf = places["ws"] / "alice" / "old-job" / "hf"
    bobs = places["ws"] / "bob" / "job9" / "hf"
    policy = _policy(places)
    assert confine_spec(_spec(model__init_from=str(own_hf)), policy.grant("alice", "job1"))["model"]["init_from"]
    with pytest.raises(StorageRefused):
        confine_spec(_spec(model__init_from=str(bobs)), policy.grant("alice", "job1"))
    admin = policy.grant("root", "job2", admin=True)
    assert confine_spec(_spec(model__init_from=str(bobs)), admin)["model"]["init_from"] == str(bobs)
    with pytest.raises(StorageRefused, match="writes only under"):  # an admin's job still writes only its own
        confine_spec(_spec(checkpoint__dir=str(places["ws"] / "bob" / "job9")), admin)


def test_the_services_own_files_stay_out_of_reach_whatever_the_roots(places, tmp_path: Path) -> None:
    wide = _policy(places, data_roots=(str(tmp_path),))  # an operator opened everything under tmp_path
    grant = wide.grant("alice", "job1")
    with pytest.raises(StorageRefused, match="holds the service's own files"):
        confine_spec(_spec(data__path=str(places["data_dir"] / "fourfold.db")), grant)
    with pytest.raises(StorageRefused, match="holds the service's own files"):  # a directory around them
        confine_spec(_spec(data__source="text", data__path=str(tmp_path)), grant)
    ok = confine_spec(_spec(data__source="text", data__path=str(places["outside"])), grant)
    assert ok["data"]["path"] == str(places["outside"])


def test_url_roots_confine_scheme_bucket_and_prefix(places) -> None:
    policy = _policy(places, data_roots=("s3://corp-data/text/",), workspace="s3://corp-ws/fourfold")
    grant = policy.grant("alice", "job1")
    spec = confine_spec(_spec(data__source="text", data__path="s3://corp-data/text/wiki"), grant)
    assert spec["data"]["path"] == "s3://corp-data/text/wiki"
    assert spec["checkpoint"]["dir"] == "s3://corp-ws/fourfold/alice/job1"
    for bad, why in [
        ("s3://corp-data/textbook", "outside"),  # a prefix of the name is not a directory
        ("gs://corp-data/text/wiki", "outside"),
        ("s3://corp-data/text/../private", "'..'"),
        ("s3://corp-data/text/%2E%2E/private", "percent-encoded"),
        ("s3://user:pw@corp-data/text/x", "credentials"),
        ("s3://corp-data/text/x?versionId=1", "query"),
        ("s3://corp-data/text//x", "empty segment"),
    ]:
        with pytest.raises(StorageRefused, match=why):
            confine_spec(_spec(data__source="text", data__path=bad), grant)
    with pytest.raises(StorageRefused, match="needs a local workspace"):
        confine_spec(_spec(checkpoint__dir="ckpt"), grant)


def test_the_rank_rechecks_and_refuses_a_link_swapped_after_submission(places) -> None:
    link = places["data"] / "current.txt"
    link.symlink_to(places["data"] / "corpus.txt")
    grant = _policy(places).grant("alice", "job1")
    spec = confine_spec(_spec(data__source="text", data__path=str(places["data"] / "current.txt")), grant)
    assert spec["data"]["path"] == str(places["data"] / "corpus.txt")  # the resolved target is what ranks open
    recheck(spec, Grant.from_dict(grant.to_dict()))  # nothing changed: fine
    # The submitted path itself becomes a link: the rank sees it resolve elsewhere and refuses.
    target = places["data"] / "corpus.txt"
    target.unlink()
    target.symlink_to(places["outside"] / "secret.txt")
    with pytest.raises(StorageRefused, match="now resolves to|outside this job's storage"):
        recheck(spec, grant)


def test_a_job_dir_replaced_by_a_link_is_refused_on_the_rank(places) -> None:
    grant = _policy(places).grant("alice", "job1")
    spec = confine_spec(_spec(), grant)
    job_dir = Path(spec["checkpoint"]["dir"])
    job_dir.parent.mkdir(parents=True)
    os.symlink(places["outside"], job_dir)
    with pytest.raises(StorageRefused, match="checkpoint.dir"):
        recheck(spec, grant)


def test_user_names_that_are_not_directory_names_are_refused(places) -> None:
    for bad in ("..", ".hidden", "a/b", ""):
        with pytest.raises(StorageRefused, match="not usable as a directory name"):
            _policy(places).grant(bad, "job1")


def test_a_rank_refuses_before_it_opens_anything_and_says_why(places) -> None:
    from workers.worker import RankRunner

    grant = _policy(places).grant("alice", "job1")
    spec = confine_spec(_spec(data__source="text", data__path=str(places["data"] / "corpus.txt")), grant)
    (places["data"] / "corpus.txt").unlink()
    (places["data"] / "corpus.txt").symlink_to(places["outside"] / "secret.txt")
    events: list[dict] = []
    runner = RankRunner(0, 1, 0, events.append)
    with pytest.raises(StorageRefused):
        runner.run(spec, "127.0.0.1", 1, storage=grant.to_dict())
    errors = [e["error"] for e in events if e["kind"] == "error"]
    assert errors and errors[0].startswith("StorageRefused: data.path=")  # the supervisor ends the job on this

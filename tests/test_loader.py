"""`ctr load` (``service.loader``) against a private redis-server: what a second load
leaves of the first, the sequence TTL, and that a user is replaced in one step."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from ctr.spec import FeatureConfig
from service.loader import LOADED_KEY, load_into_redis
from service.store import item_key, user_key
from tests.helpers import small_config
from tests.redis_proc import RedisProcess, private_redis


@pytest.fixture(scope="module")
def data() -> tuple[FeatureConfig, pd.DataFrame]:
    from training.data import load_frame

    config = small_config("din", n_users=40)
    return config, load_frame(config)


@pytest.fixture()
def rp() -> Iterator[RedisProcess]:
    with private_redis() as proc:
        yield proc


def test_a_load_replaces_each_item_features_hash(
    data: tuple[FeatureConfig, pd.DataFrame], rp: RedisProcess
) -> None:
    """A second load leaves nothing of the first's item features: an item whose value
    the new data lacks reads as missing (the feature's default, as training had it),
    not the old value, and an item no data holds is gone."""
    config, frame = data
    r = rp.client()
    load_into_redis(config, frame, rp.url, progress=False)
    price = next(f for f in config.item_dense if f.name == "item_price")
    key = item_key(price.source)
    item = min(r.hkeys(key))  # the client decodes replies
    assert r.hget(key, item) is not None
    r.hset(key, "ghost-item", "1.5")  # written by an earlier load of other data
    changed = frame.copy()
    changed.loc[changed[config.item_id_feature.source] == item, price.source] = float("nan")
    load_into_redis(config, changed, rp.url, progress=False)
    assert r.hget(key, item) is None
    assert r.hget(key, "ghost-item") is None
    assert r.hlen(key) == len(r.hkeys(key)) > 0  # the other items' values are all back
    other = item_key(next(f for f in config.item_sparse if f.name == "cate_id").source)
    assert r.hget(other, item) is not None  # the item's other features stand


@pytest.mark.parametrize("ttl", [0, 3600])
def test_a_loaded_sequence_expires_as_an_appended_one(
    data: tuple[FeatureConfig, pd.DataFrame], rp: RedisProcess, ttl: int
) -> None:
    """CTR_SEQUENCE_TTL_S reaches ``ctr load``: a loaded user's behaviours expire as an
    appended event's do (0: never; a later load with 0 lifts an earlier expiry)."""
    config, frame = data
    r = rp.client()
    load_into_redis(config, frame, rp.url, progress=False, sequence_ttl_s=7200)
    load_into_redis(config, frame, rp.url, progress=False, sequence_ttl_s=ttl)
    seqs = list(r.scan_iter("{u:*}:seq"))
    assert seqs
    for seq in seqs:
        left = r.ttl(seq)
        assert (0 < left <= ttl) if ttl else left == -1, (seq, left)
    profiles = list(r.scan_iter("{u:*}:profile"))
    assert profiles and all(r.ttl(p) == -1 for p in profiles)  # the profile stays


def test_every_write_to_a_users_keys_is_one_script_call(
    data: tuple[FeatureConfig, pd.DataFrame], rp: RedisProcess
) -> None:
    """Each user's replace (DEL of the profile, the list and the event IDs, then HSET
    and RPUSH) runs inside one script call, so that an event appended meanwhile lands
    wholly before it or wholly after it. Issued as separate commands, an append between
    the DEL and the RPUSH left its event ahead of the loaded ones, and the next append
    trimmed it away while its ID stayed recorded (a retry then answered `duplicate`)."""
    config, frame = data
    users = sorted(frame[config.data.user_key].astype(str).unique())[:3]
    small = frame[frame[config.data.user_key].astype(str).isin(users)]
    r = rp.client()
    outside: list[str] = []
    scripted: list[str] = []
    with r.monitor() as mon:
        done = threading.Thread(
            target=load_into_redis, args=(config, small, rp.url), kwargs={"progress": False}
        )
        done.start()
        for cmd in mon.listen():
            text = cmd["command"]
            if "{u:" in text:
                (scripted if cmd.get("client_type") == "lua" else outside).append(text)
            if text.startswith(f"SET {LOADED_KEY} "):
                break
        done.join(30)
    assert outside and all(c.startswith("EVALSHA ") for c in outside), outside
    assert len(outside) == len(users)  # one call per user
    for uid in users:
        mine = [c for c in scripted if user_key(uid, "") in c]
        assert mine[0].startswith("DEL ") and any(c.startswith("RPUSH ") for c in mine)


def test_a_server_that_lost_the_script_gets_it_again(
    data: tuple[FeatureConfig, pd.DataFrame], rp: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that lost the replace script (a restart, a failover) refuses the calls
    with NOSCRIPT: the loader loads it again and runs those calls once more, and the
    users are all there."""
    import hashlib

    import service.loader as loader

    config, frame = data
    r = rp.client()
    real, loads = r.script_load, []

    def forgetful(script: str) -> str:
        """The first load is lost at once, as by a restart between it and the calls."""
        loads.append(script)
        if len(loads) == 1:
            r.script_flush()
            return hashlib.sha1(script.encode()).hexdigest()
        return str(real(script))

    monkeypatch.setattr(r, "script_load", forgetful)
    monkeypatch.setattr(loader, "sync_client", lambda url, cluster, timeout_s=10: r)
    counts = load_into_redis(config, frame, rp.url, progress=False)
    assert len(loads) >= 2  # loaded again after the refusal
    users = {u for u in frame[config.data.user_key].astype(str)}
    assert counts["users"] == len(users)
    probe = rp.client()
    assert all(probe.exists(user_key(u, "seq")) for u in users)


def test_loading_another_data_set_into_a_database_warns(
    data: tuple[FeatureConfig, pd.DataFrame],
    rp: RedisProcess,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every key is global to the database: a second data set's load replaced the
    first's item hashes and shared users without a word (a model served from the first
    then scored every candidate at its features' defaults). ``ctr load`` says so,
    naming the data set the database held; the same data again, or a config that reads
    the same data differently, is no other data set."""
    from ctr.cli import main

    config, frame = data
    assert load_into_redis(config, frame, rp.url, progress=False)["replaced"] is None
    assert load_into_redis(config, frame, rp.url, progress=False)["replaced"] is None
    longer = config.model_copy(update={"max_seq_len": 30, "name": "din_long"})
    assert load_into_redis(longer, frame, rp.url, progress=False)["replaced"] is None
    client = rp.client()
    client.hset(item_key("brand"), "i1", "b1")  # a feature of the held data the next lacks
    assert load_into_redis(longer, frame, rp.url, progress=False)["replaced"] is None
    assert client.exists(item_key("brand"))  # the same data set: its keys are left alone
    base = ["load", "--redis-url", rp.url, "--quiet", "--config", "configs/synthetic_din.yaml",
            "--set", "data.options.n_users=40"]  # fmt: skip
    assert main([*base, "--set", "data.options.seed=8"]) == 0  # other data: another seed
    err = capsys.readouterr().err
    assert f"warning: {rp.url} held another data set (config 'din_long'" in err
    assert "source 'synthetic'" in err and "two Redis databases" in err
    # what differs is said: the two share a config name and source
    assert "options {" in err and "'seed': 8" in err and "(this one's: {" in err
    # the other data's item features the new one lacks were left with its values
    # ("gone", said the warning): deleted; the new data's own are there
    assert not client.exists(item_key("brand"))
    assert client.exists(item_key("cate_id")) and client.exists(item_key("item_price"))
    assert main([*base, "--set", "data.options.seed=8"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert rp.client().exists(LOADED_KEY)


def test_ids_no_request_can_name_are_counted_by_the_load(
    data: tuple[FeatureConfig, pd.DataFrame], rp: RedisProcess
) -> None:
    """The loader wrote any ID; one the API refuses (control characters, longer than
    CTR_MAX_ID_LENGTH) was data nobody could ever score, unreported. Counted, with
    the first."""
    config, frame = data
    changed = frame.copy()
    users = changed[config.data.user_key].astype(str)
    changed.loc[users == users.iloc[0], config.data.user_key] = "u\t1"
    items = changed[config.item_id_feature.source].astype(str)
    changed.loc[items == items.iloc[0], config.item_id_feature.source] = "i" * 40
    counts = load_into_redis(config, changed, rp.url, progress=False, max_id_length=32)
    assert counts["unreachable_users"] == (1, "u\t1")
    assert counts["unreachable_items"] == (1, "i" * 40)
    counts = load_into_redis(config, frame, rp.url, progress=False, max_id_length=32)
    assert counts["unreachable_users"] == (0, None) == counts["unreachable_items"]


def test_a_bundles_load_refuses_data_it_was_not_trained_on(
    tmp_path: Path, rp: RedisProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ctr load --bundle`` read whatever CTR_DATA_ROOT held (another category's files,
    a shorter file) and loaded it for a model never trained on it, silently. The data's
    training split is checked against the manifest's data_fingerprint: the same data
    loads, other data is refused in one line, unless --force, or --set changes the data
    on purpose."""
    import json

    from ctr.cli import main
    from tests.helpers import build_bundle

    built = build_bundle(tmp_path, "din")
    bundle = str(built.models_dir / built.config.name)
    args = ["load", "--bundle", bundle, "--redis-url", rp.url, "--quiet"]
    assert main(args) == 0
    path = built.models_dir / built.config.name / "1" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["data_fingerprint"] = "0" * 64  # trained on other data than is read now
    path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "is not the data" in err and "the manifest's 000000000000" in err
    assert main([*args, "--force"]) == 0
    assert main([*args, "--set", "data.options.n_users=50"]) == 0  # other data on purpose
    # an override that leaves the data as it was is checked still
    assert main([*args, "--set", f"max_seq_len={built.config.max_seq_len}"]) == 2
    assert main([*args, "--set", "train.epochs=3"]) == 2


def test_a_random_split_bundles_own_data_loads(tmp_path: Path, rp: RedisProcess) -> None:
    """The manifest's config leaves data.split_seed out: a random split with another
    seed than the default was checked against the default's split, and its own data
    refused. The export records the seed."""
    import json

    from ctr.cli import main
    from tests.helpers import small_config
    from training.data import load_frame
    from training.dataset import prepare
    from training.export import export_bundle
    from training.train import load_run, train

    config = small_config("din", "din_random")
    config = config.model_copy(
        update={"data": config.data.model_copy(update={"split": "random", "split_seed": 7})})
    train(config, tmp_path / "run", prep=prepare(config, load_frame(config)), progress=False)
    _, mapper, model, metrics = load_run(tmp_path / "run")
    _, path, _ = export_bundle(model, config, mapper, metrics, tmp_path / "models")
    assert json.loads((path / "manifest.json").read_text())["data_split_seed"] == 7
    assert main(["load", "--bundle", str(path), "--redis-url", rp.url, "--quiet"]) == 0


# ---- session 38 (fault review): a load Redis lost meanwhile is no complete load --------


def test_a_load_whose_writes_redis_lost_is_not_recorded_as_complete(
    data: tuple[FeatureConfig, pd.DataFrame],
    rp: RedisProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Redis restarted without its data while a load ran (redis-py reconnects silently):
    the load recorded ``ctr:loaded`` over an empty database, exit 0, and every later
    ``--once`` skipped it, serving every user without history. The load now fails,
    records nothing, and ``--once`` loads again."""
    import service.loader as loader
    from ctr.cli import main
    from service.heldset import DATA_KEY

    config, frame = data
    real = loader.item_records

    def restarted(*args: object, **kwargs: object) -> object:
        rp.client().flushall()  # the users written are gone, as by a restart without them
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "item_records", restarted)
    with pytest.raises(loader.LoadLost, match="Redis lost this load's writes meanwhile"):
        load_into_redis(config, frame, rp.url, progress=False)
    r = rp.client()
    assert not r.exists(LOADED_KEY) and not r.exists(DATA_KEY)
    args = ["load", "--redis-url", rp.url, "--quiet", "--config", "configs/synthetic_din.yaml",
            "--set", "data.options.n_users=40", "--once"]  # fmt: skip
    assert main(args) == 2
    assert "error: LoadLost: Redis lost this load's writes" in capsys.readouterr().err
    monkeypatch.setattr(loader, "item_records", real)
    assert main(args) == 0  # not skipped: nothing recorded
    assert "loaded 40 users" in capsys.readouterr().out
    assert r.exists(LOADED_KEY) and not r.exists(loader.LOADING_KEY)
    assert main(args) == 0 and "not loading" in capsys.readouterr().out  # now it skips


def test_a_load_cut_short_leaves_its_data_set_marked_incomplete(
    data: tuple[FeatureConfig, pd.DataFrame], rp: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load of another data set killed halfway left users of both under the first
    one's name: a service read it as the data set it was trained on. The record names
    the new data set, incomplete, from the first write until the load ends."""
    import orjson

    import service.loader as loader
    from service.heldset import DATA_KEY

    config, frame = data
    load_into_redis(config, frame, rp.url, progress=False)
    r = rp.client()
    assert "complete" not in orjson.loads(r.get(DATA_KEY))  # a complete load's record

    class Stop(Exception):
        """Stands for a Ctrl-C or a kill (a KeyboardInterrupt would stop pytest)."""

    def killed(*args: object, **kwargs: object) -> None:
        raise Stop

    data_b = config.data.model_copy(update={"options": {**config.data.options, "seed": 8}})
    other = config.model_copy(update={"name": "din_other", "data": data_b})
    real = loader._replace_users
    monkeypatch.setattr(loader, "_replace_users", killed)
    with pytest.raises(Stop):
        load_into_redis(other, frame, rp.url, chunk=10, progress=False)
    monkeypatch.setattr(loader, "_replace_users", real)
    held = orjson.loads(r.get(DATA_KEY))
    assert held["complete"] is False and held["name"] == "din_other"
    assert held["options"]["seed"] == 8 and not r.exists(LOADED_KEY)
    # stopped before its first write (while it builds its records): the record stands
    load_into_redis(config, frame, rp.url, progress=False)
    own = r.get(DATA_KEY)

    monkeypatch.setattr(loader, "user_records", killed)
    with pytest.raises(Stop):
        load_into_redis(other, frame, rp.url, progress=False)
    assert r.get(DATA_KEY) == own


def test_retry_of_an_interrupted_load_still_drops_the_old_data_sets_item_hashes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A load of another data set cut short before it dropped the old set's item
    hashes: its retry read the incomplete record as its own data, replaced nothing and
    said nothing, and the old set's features stayed for good. The incomplete record
    carries the set it was replacing."""
    import service.loader as loader
    from tests.helpers import small_config
    from training.data import load_frame

    proc = RedisProcess().start()
    try:
        url, client = proc.url, proc.client()
        a = small_config("din", n_users=40)
        load_into_redis(a, load_frame(a), url, progress=False)
        client.hset(item_key("brand"), "i1", "b1")  # data set A's feature B lacks
        b = small_config("din", n_users=40, seed=8)  # another data set
        frame_b = load_frame(b)
        real = loader._replace_items

        def cut(*args: object, **kw: object) -> None:
            raise KeyboardInterrupt  # Ctrl-C while the item hashes are written

        monkeypatch.setattr(loader, "_replace_items", cut)
        with pytest.raises(KeyboardInterrupt):
            load_into_redis(b, frame_b, url, progress=False)
        monkeypatch.setattr(loader, "_replace_items", real)
        out = load_into_redis(b, frame_b, url, progress=False)  # the retry completes
        assert not client.exists(item_key("brand")), (
            f"A's ctr:item:brand kept after B's load completed (replaced={out['replaced']})")
        assert out["replaced"] is not None and "'seed': 8" in out["replaced_differs"]
        again = load_into_redis(b, frame_b, url, progress=False)  # complete: nothing due
        assert again["replaced"] is None
    finally:
        proc.stop()


@pytest.mark.parametrize("replay", ["val", "test"])
def test_a_replay_load_stores_each_user_as_of_its_first_example_in_the_split(
    data: tuple[FeatureConfig, pd.DataFrame], rp: RedisProcess, replay: str
) -> None:
    """``ctr load --replay-split``: each user of the split holds the history its first
    example there held in training, nothing after it (a plain load stores the newest,
    whose later behaviours, the clicked candidates among them, made a replay of the
    test split score 0.045 AUC above the offline figure: a skew review, session 47).
    Its ctr:loaded identity differs from a plain load's, which is as before."""
    import json

    import orjson

    from service.heldset import DATA_KEY
    from service.loader import load_identity, loaded_identity
    from training.data import split_frame

    config, frame = data
    _, val, test = split_frame(frame, config.data, seed=config.data.split_seed)
    split = {"val": val, "test": test}[replay]
    r = rp.client()
    hist = config.sequences[0].source
    item = config.sequence_targets[0].source
    user = config.data.user_key

    def stored(uid: str) -> list[str]:
        return [json.loads(e)[item] for e in r.lrange(user_key(uid, "seq"), 0, -1)]

    load_into_redis(config, frame, rp.url, progress=False)
    newest = {uid: stored(uid) for uid in split[user].unique()}
    plain = loaded_identity(rp.url, False)
    assert plain == load_identity(config) == load_identity(config, replay=None)
    assert "replay" not in orjson.loads(r.get(DATA_KEY))
    load_into_redis(config, frame, rp.url, progress=False, user_frame=split, replay=replay)
    assert loaded_identity(rp.url, False) == load_identity(config, replay=replay) != plain
    assert orjson.loads(r.get(DATA_KEY))["replay"] == replay  # the service says so
    shorter = 0
    for uid, rows in split.sort_values("ts", kind="stable").groupby(user, sort=False):
        want = list(rows[hist].iloc[0])[-config.max_seq_len :]
        assert stored(uid) == want, uid
        shorter += len(want) < len(newest[uid])
    # the synthetic candidates are no behaviours: the test split's first example is the
    # newest (the same history); validation's is an earlier one, shorter
    assert (shorter > 0) == (replay == "val"), shorter

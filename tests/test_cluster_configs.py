"""Every shipped cluster config (cluster/*.yaml) turns on Ray token authentication, and the README says
how to reach the dashboard through a tunnel."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "cluster").glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def _ray_cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster specs of a KubeRay object (RayCluster, RayJob, RayService)."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "RayCluster":
        return [spec]
    if kind in ("RayJob", "RayService"):
        return [spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or {}]
    return []


def _token_auth_problem(path: Path) -> str | None:
    docs = _docs(path)
    kuberay = [s for d in docs for s in _ray_cluster_specs(d)]
    if kuberay:
        for spec in kuberay:
            if (spec.get("authOptions") or {}).get("mode") != "token":
                return "a RayCluster spec without authOptions.mode: token"
        return None
    launcher = [d for d in docs if "head_start_ray_commands" in d]
    if launcher:
        (cfg,) = launcher
        mounts = cfg.get("file_mounts") or {}
        if "~/.ray/auth_token" not in mounts:
            return "file_mounts does not copy ~/.ray/auth_token to the nodes"
        setup = " ".join(cfg.get("setup_commands") or [])
        if "RAY_AUTH_MODE=token" not in setup:
            return "setup_commands do not set RAY_AUTH_MODE=token"
        return None
    return "not a cluster config this test knows (KubeRay object or cluster-launcher YAML)"


def test_there_are_cluster_configs():
    assert {p.name for p in CONFIGS} >= {"rayjob.yaml", "ray-cluster.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_cluster_config_enables_token_auth(path):
    assert _token_auth_problem(path) is None, f"{path.name}: {_token_auth_problem(path)}"


def test_readme_says_how_to_reach_the_dashboard_through_a_tunnel():
    text = (ROOT / "cluster" / "README.md").read_text()
    for needle in (
        "kubectl port-forward",
        "ssh -i",
        "-L 8265:127.0.0.1:8265",
        "RAY_AUTH_TOKEN",
        "authOptions",
    ):
        assert needle in text, needle

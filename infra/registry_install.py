"""Fetch Apicurio Registry from Maven Central into the cache, once per version.

Maven, as for the Kafka jars (:mod:`tokenaudit.infra.kafka_install`): the artifact is
``io.apicurio:apicurio-registry-app:<version>``, classifier ``all``, type ``tar.gz`` (a Quarkus
app, ``quarkus-run.jar`` plus its ``lib/``); Maven keeps it in ``~/.m2`` and checks its
checksum, so a second machine on the same repository mirror needs no download.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tokenaudit.errors import RegistryError

ARTIFACT = "io.apicurio:apicurio-registry-app:{version}:tar.gz:all"


def app_dir(cache_dir: Path, version: str) -> Path:
    return cache_dir / f"apicurio-registry-{version}"


def is_installed(cache_dir: Path, version: str) -> bool:
    return (app_dir(cache_dir, version) / "COMPLETE").is_file()


def install(cache_dir: Path, version: str) -> Path:
    """The folder holding ``quarkus-run.jar``, fetching and unpacking it first if needed."""
    target = app_dir(cache_dir, version)
    if is_installed(cache_dir, version):
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RegistryError(
            "Maven ('mvn') is needed once to fetch Apicurio Registry from Maven Central: "
            "install it (apt-get install maven) and retry, or set TOKENAUDIT_SCHEMA_REGISTRY_URL"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="apicurio.", dir=cache_dir) as work:
        cmd = [
            mvn,
            "-B",
            "-q",
            "dependency:copy",
            f"-Dartifact={ARTIFACT.format(version=version)}",
            f"-DoutputDirectory={work}",
        ]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=work)
        tarballs = list(Path(work).glob("*.tar.gz"))
        if proc.returncode != 0 or not tarballs:
            detail = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "ERROR" in ln][:1]
            raise RegistryError(
                f"could not fetch Apicurio Registry {version} from Maven Central "
                f"({detail[0].strip() if detail else 'mvn exited ' + str(proc.returncode)}); check network "
                "access to Maven Central, set TOKENAUDIT_REGISTRY_VERSION, or TOKENAUDIT_SCHEMA_REGISTRY_URL"
            )
        staging = Path(work) / "app"
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(staging, filter="data")
        if not (staging / "quarkus-run.jar").is_file():
            raise RegistryError(f"the Apicurio Registry {version} tarball holds no quarkus-run.jar")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    (target / "COMPLETE").write_text(version + "\n")
    return target

"""Fetch the Kafka broker runtime from Maven Central into the cache, once per version.

Maven resolves kafka_2.13's whole runtime closure (scala, jackson, log4j2, ...) exactly as
Kafka declares it, which hand-listing jars would get wrong on the next upgrade.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from tokenaudit.errors import KafkaInstallError


def libs_dir(cache_dir: Path, version: str) -> Path:
    return cache_dir / f"kafka-{version}" / "libs"


def is_installed(cache_dir: Path, version: str) -> bool:
    return (libs_dir(cache_dir, version).parent / "COMPLETE").is_file()


def install(cache_dir: Path, version: str, quiet: bool = True) -> Path:
    """Return the libs folder, downloading it first if this version is not cached."""
    target = libs_dir(cache_dir, version)
    if is_installed(cache_dir, version):
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaInstallError(
            "Maven ('mvn') is needed once to fetch Kafka jars from Maven Central: "
            "install it (apt-get install maven) and retry"
        )
    pom_text = resources.files("tokenaudit.infra").joinpath("kafka/pom.xml").read_text()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="libs.", dir=target.parent))
    with tempfile.TemporaryDirectory() as work:
        pom = Path(work) / "pom.xml"
        pom.write_text(pom_text.replace("@KAFKA_VERSION@", version))
        cmd = [
            mvn,
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ]
        if quiet:
            cmd.insert(2, "-q")
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        detail = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "ERROR" in ln][:1]
        raise KafkaInstallError(
            f"could not fetch Apache Kafka {version} from Maven Central "
            f"({detail[0].strip() if detail else 'mvn exited ' + str(proc.returncode)}); "
            "check network access to Maven Central or set TOKENAUDIT_KAFKA_VERSION"
        )
    if not any(staging.glob("kafka_2.13-*.jar")):
        shutil.rmtree(staging, ignore_errors=True)
        raise KafkaInstallError(f"Maven returned no kafka_2.13 jar for version {version}")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    (target.parent / "COMPLETE").write_text(version + "\n")
    return target

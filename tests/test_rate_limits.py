"""Per-key rate limits, the pure part: the limits in the key registry (`keys add|update --rpm
--tpm`, bad values refused with nothing stored) and the buckets' reserve/settle arithmetic on a
clock the test moves. No broker, no model (the HTTP side: test_rate_limits_http.py)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tokenaudit.inference.http_io import ApiError
from tokenaudit.inference.rate_limits import Meter, RateLimiter, duration
from tokenaudit.infra.keys import ApiKey, KeyRegistryError, add_key, key_id_of, parse_registry, update_key_limits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _key(rpm: int | None = None, tpm: int | None = None) -> ApiKey:
    return ApiKey("k_0123456789ab", "acme", "research", rpm=rpm, tpm=tpm)


def _headers(meter: Meter) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in meter.headers()}


def test_a_burst_past_the_requests_limit_is_refused_until_the_bucket_refills():
    clock = Clock()
    limiter, key = RateLimiter(clock), _key(rpm=3)
    for _ in range(3):
        Meter(limiter, key).reserve(10)
    with pytest.raises(ApiError) as refused:
        Meter(limiter, key).reserve(10)
    err = refused.value
    assert (err.status, err.code) == (429, "rate_limit_exceeded") and "requests per minute" in err.message
    assert err.headers == {"Retry-After": "20"}, "one request comes back every 60/3 s"
    assert _headers(Meter(limiter, key)) == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s",
    }, "only the limited dimension's headers"
    clock.now += 19.9
    with pytest.raises(ApiError):
        Meter(limiter, key).reserve(10)
    clock.now += 0.1
    Meter(limiter, key).reserve(10)  # the refused attempts took nothing
    with pytest.raises(ApiError):
        Meter(limiter, key).reserve(10)


def test_tokens_reserve_the_worst_case_and_settle_to_what_was_used():
    clock = Clock()
    limiter, key = RateLimiter(clock), _key(rpm=100, tpm=120)
    first, second = Meter(limiter, key), Meter(limiter, key)
    first.reserve(70)  # input + max_new_tokens
    with pytest.raises(ApiError) as refused:  # 50 left: a concurrent worst case of 70 does not fit
        second.reserve(70)
    assert "tokens per minute" in refused.value.message
    assert refused.value.headers == {"Retry-After": "10"}, "20 tokens at 2 tokens/s"
    assert _headers(second)["x-ratelimit-remaining-tokens"] == "50"
    first.settle(30)  # it used 30 of the 70 reserved: 40 come back
    assert _headers(second)["x-ratelimit-remaining-tokens"] == "90"
    second.reserve(70)
    second.settle(95)  # used more than reserved (cannot happen today): counted all the same
    headers = _headers(second)
    assert headers["x-ratelimit-remaining-tokens"] == "0" and headers["x-ratelimit-remaining-requests"] == "98"
    assert headers["x-ratelimit-reset-tokens"] == "1m2.5s", "125 tokens short of full at 2 tokens/s"
    second.settle(0)
    assert _headers(second)["x-ratelimit-remaining-tokens"] == "0", "a second settle changes nothing"
    never = Meter(limiter, key)
    with pytest.raises(ApiError) as too_big:
        never.reserve(121)
    assert "over the key's limit of 120 tokens per minute" in too_big.value.message
    never.settle(50)  # refused: nothing reserved, nothing refunded
    assert _headers(never)["x-ratelimit-remaining-tokens"] == "0"
    assert _headers(never)["x-ratelimit-remaining-requests"] == "98"


def test_changed_limits_apply_to_the_running_buckets():
    clock = Clock()
    limiter = RateLimiter(clock)
    Meter(limiter, _key(rpm=10)).reserve(1)
    raised = Meter(limiter, _key(rpm=20))
    assert _headers(raised)["x-ratelimit-remaining-requests"] == "19", "a raise adds the difference"
    lowered = Meter(limiter, _key(rpm=5))
    assert _headers(lowered)["x-ratelimit-remaining-requests"] == "5", "a cut caps what is left"
    assert _headers(Meter(limiter, _key(tpm=7))) == {
        "x-ratelimit-limit-tokens": "7",
        "x-ratelimit-remaining-tokens": "7",
        "x-ratelimit-reset-tokens": "0ms",
    }


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0ms"), (0.0204, "20ms"), (1.0, "1s"), (1.5, "1.5s"), (60.0, "1m0s"), (361.25, "6m1.25s")],
)
def test_reset_durations_are_written_as_openai_writes_them(seconds, text):
    assert duration(seconds) == text


def test_limits_are_stored_read_back_and_updated(tmp_path):
    path = tmp_path / "keys.toml"
    raw = add_key(path, "acme", rpm=60, tpm=10_000)
    other = add_key(path, "beta")
    keys = {k.key_id: k for k in parse_registry(path).values()}
    assert (keys[key_id_of(raw)].rpm, keys[key_id_of(raw)].tpm) == (60, 10_000)
    assert (keys[key_id_of(other)].rpm, keys[key_id_of(other)].tpm) == (None, None)
    updated = update_key_limits(path, key_id_of(other), rpm=5, tpm=None)
    assert (updated.client_id, updated.rpm, updated.tpm) == ("beta", 5, None)
    again = {k.key_id: k for k in parse_registry(path).values()}
    assert (again[key_id_of(other)].rpm, again[key_id_of(other)].tpm) == (5, None)
    assert again[key_id_of(raw)] == keys[key_id_of(raw)], "the other key is untouched"


@pytest.mark.parametrize("bad", [0, -1, True, "5", 1.5, 10**13])
def test_bad_limits_are_refused_and_nothing_is_stored(tmp_path, bad):
    path = tmp_path / "keys.toml"
    raw = add_key(path, "acme")
    before = path.read_bytes()
    with pytest.raises(KeyRegistryError, match="--rpm must be a whole number"):
        add_key(path, "acme", rpm=bad)
    with pytest.raises(KeyRegistryError, match="--tpm must be a whole number"):
        update_key_limits(path, key_id_of(raw), rpm=None, tpm=bad)
    with pytest.raises(KeyRegistryError, match="no key"):
        update_key_limits(path, "k_000000000000", rpm=5, tpm=None)
    assert path.read_bytes() == before


def test_a_registry_with_a_bad_limit_is_malformed(tmp_path):
    path = tmp_path / "keys.toml"
    add_key(path, "acme", rpm=5)
    path.write_text(path.read_text().replace("rpm = 5", "rpm = 0"))
    with pytest.raises(KeyRegistryError, match=r"entry 0 is invalid.*--rpm must be"):
        parse_registry(path)


def test_keys_cli_add_and_update_limits(data_dir):
    from tokenaudit.cli import main

    def run(*args: str):
        return CliRunner().invoke(main, list(args))

    path = data_dir / "api_keys.toml"
    refused = [run("keys", "add", "--client", "acme", "--rpm", v) for v in ("0", "-3", "many")]
    assert all(r.exit_code == 2 and "--rpm" in r.output for r in refused), refused[0].output
    assert not path.exists(), "nothing stored"
    added = run("keys", "add", "--client", "acme", "--rpm", "60", "--tpm", "5000")
    assert added.exit_code == 0, added.output
    key_id = key_id_of(added.stdout.strip().splitlines()[0])

    def limits() -> tuple[object, object]:
        (row,) = json.loads(run("keys", "list", "--format", "json").stdout)
        return row["rpm"], row["tpm"]

    assert limits() == (60, 5000)
    updated = run("keys", "update", key_id, "--tpm", "800")
    assert updated.exit_code == 0 and "rpm 60, tpm 800" in updated.output, updated.output
    assert limits() == (60, 800), "the limit not given keeps its value"
    assert run("keys", "update", key_id, "--tpm", "0").exit_code == 2
    assert run("keys", "update", key_id).exit_code == 2, "nothing to change is a usage error"
    assert run("keys", "update", key_id, "--no-limits", "--rpm", "5").exit_code == 2
    unknown = run("keys", "update", "k_000000000000", "--rpm", "5")
    assert unknown.exit_code == 1 and "no key" in unknown.output
    assert limits() == (60, 800)
    assert run("keys", "update", key_id, "--no-limits").exit_code == 0
    assert limits() == ("", "")

"""Shared pytest setup. Area fixtures live in tests/fixtures_<area>.py and are listed here."""

pytest_plugins: list[str] = [
    "tests.fixtures_s3",
    "tests.fixtures_data",
    "tests.fixtures_kube",
    "tests.fixtures_train",
]

"""The service's tests. Their settings are the fixtures' alone: the `AIDSAFE_*` variables a
shell exported to run the service (the README's `export AIDSAFE_LLM_...`) are dropped here,
before any module reads them, so they change neither the tests' settings nor the workers the
tests start. `AIDSAFE_TEST_*` (tests/conftest.py) are the tests' own."""

import os

for _name in [
    name for name in os.environ if name.startswith("AIDSAFE_") and not name.startswith("AIDSAFE_TEST_")
]:
    del os.environ[_name]

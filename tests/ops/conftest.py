"""Set-up shared by the op tests of Triton backends with a launch-configuration override."""
import pytest


@pytest.fixture
def config(request):
    """The launch-configuration override of one test (its indirect parameter, none without one),
    set in the test module's CONFIG_OVERRIDE (its backend's) and cleared after the test, so that
    every other test runs on the defaults."""
    override = request.module.CONFIG_OVERRIDE
    override.update(getattr(request, "param", {}))
    yield
    override.clear()

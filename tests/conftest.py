pytest_plugins = [
    "tests.support.docker_plugin",
    "tests.support.redis_plugin",
    "tests.support.cluster_plugin",
]

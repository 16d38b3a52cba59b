"""python -m proxy: the same as the kafka-reverse-proxy command."""

from proxy.cli import main

raise SystemExit(main())

from arx.cli import main

raise SystemExit(main())

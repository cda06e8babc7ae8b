from livediff.cli import main

raise SystemExit(main())

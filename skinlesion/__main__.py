from skinlesion.cli import main

raise SystemExit(main())

from gradwise.cli import main

raise SystemExit(main())

from carousel.cli import main
import sys
sys.exit(main())

"""The chaos soak's web tier: config.wsgi, and place_order v2 (perf.chaos_deploy) once the soak has
deployed it: from then on the file named by CHAOS_DEPLOYED exists, and the gunicorn started for the
deploy (perf.chaos_web.WebTier.redeploy) imports the new version as it loads the app."""

import os
from pathlib import Path

from config.wsgi import application  # noqa: F401 - what gunicorn serves

if os.environ.get("CHAOS_DEPLOYED") and Path(os.environ["CHAOS_DEPLOYED"]).exists():
    import perf.chaos_deploy  # noqa: F401 - registers place_order v2 beside v1

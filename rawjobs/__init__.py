"""rawjobs: a self-hosted async job runner on its own HTTP/1.1 server.

The public API for defining job types::

    from rawjobs import job_type, Param, JobContext
"""

from .core.jobs import JobContext, JobType, JobTypeError, Param, job_type
from .core.procpool import SyncJobContext

__all__ = ["JobContext", "JobType", "JobTypeError", "Param", "SyncJobContext", "job_type"]
__version__ = "0.1.0"

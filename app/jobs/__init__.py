"""Training jobs: a task memory trained from labelled rows sent to the service, while it serves.

data.py and options.py check what a job is asked to do (before anything is queued); records.py (and
s3records.py) keep each job's record in the store; manager.py queues and supervises jobs; worker.py
is the process that trains one (`python -m app.jobs.worker`), watched through progress.py and talking
back in protocol.py's events. The finished memory goes through the registry's upload path.
"""

-- wrk script: POST one no-op bench job per request (bench/cases.py queue_http).
wrk.method = "POST"
wrk.body = '{"job_type":"bench","params":{"events":0}}'
wrk.headers["Content-Type"] = "application/json"

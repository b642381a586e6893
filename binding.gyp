{
  "targets": [
    {
      "target_name": "fastio",
      "sources": ["native/fastio.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}

"""The test S3 server holds a whole session's buckets: every test that writes gets its own."""

from concurrent.futures import ThreadPoolExecutor

# More live buckets than one CI session makes; the server's automatic volume limit on a small
# disk (free space / volume size) stopped writes at about 60.
LIVE_BUCKETS = 90


def test_server_takes_writes_in_more_live_buckets_than_a_session_makes(s3_server):
    client = s3_server.client()

    def write(_: int) -> str:
        name = s3_server.new_bucket()
        client.put_object(Bucket=name, Key="k", Body=b"v")
        return name

    with ThreadPoolExecutor(8) as pool:
        names = list(pool.map(write, range(LIVE_BUCKETS)))
    try:
        assert [client.get_object(Bucket=n, Key="k")["Body"].read() for n in names] == [b"v"] * LIVE_BUCKETS
    finally:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(s3_server.delete_bucket, names))


def test_a_bucket_with_objects_is_emptied_and_deleted(s3_server):
    client = s3_server.client()
    name = s3_server.new_bucket()
    client.put_object(Bucket=name, Key="a/b", Body=b"v")
    s3_server.delete_bucket(name)
    assert name not in {b["Name"] for b in client.list_buckets()["Buckets"]}

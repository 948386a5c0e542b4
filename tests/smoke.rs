mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_then_get() {
    let server = common::TestServer::start().await;
    let put = server
        .client
        .put("a/b", "v", kvstore::storage::Condition::Any)
        .await
        .unwrap();
    assert_eq!(put.version, 1);
    let got = server.client.get("a/b").await.unwrap().unwrap();
    assert_eq!(got.value.as_deref(), Some("v"));
    let dir = server.stop().await.unwrap();
    let path = dir.path().to_path_buf();
    let server = common::TestServer::start_in(Some(dir), path, Default::default(), |_| {}).await;
    let got = server.client.get("a/b").await.unwrap().unwrap();
    assert_eq!(got.revision, 1);
    server.stop().await;
}

//! `GET /v1/kv`: bounds, prefixes, limits, order, keys-only listings, cursors
//! and the page size cap.

use crate::harness::TestServer;
use crate::requests::*;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kvstore::client::Client;
use kvstore::server::ServerConfig;

const PAGE_VALUE_BYTES: usize = 4 << 20;

fn strings(keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| (*k).to_owned()).collect()
}

/// Asserts the keys of one page of `GET /v1/kv?{query}`.
async fn assert_lists(client: &Client, query: &str, expected: &[&str]) {
    assert_eq!(
        list_keys(client, query).await,
        strings(expected),
        "?{query}"
    );
}

/// Asserts that `GET /v1/kv?{query}` is refused with 400 `invalid_request`.
async fn assert_bad_query(client: &Client, query: &str) {
    let response = get(client, &format!("/v1/kv?{query}")).await;
    expect_error(&response, StatusCode::BAD_REQUEST, "invalid_request");
}

/// The next cursor of a page, which must be there.
fn cursor(page: &Value) -> String {
    page["next_cursor"]
        .as_str()
        .unwrap_or_else(|| panic!("no next_cursor: {page}"))
        .to_owned()
}

/// `count` keys `{prefix}000`, `{prefix}001`, ...
fn numbered(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}{i:03}")).collect()
}

async fn seed_strings(client: &Client, keys: &[String]) {
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    seed_keys(client, &refs).await;
}

for_each_backend! {

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_is_inclusive_and_end_exclusive_in_both_directions() {
    let server = TestServer::start().await;
    let c = &server.client;
    seed_keys(c, &["a", "b", "c", "d", "e"]).await;
    for (query, expected) in [
        ("", &["a", "b", "c", "d", "e"][..]),
        ("start=b&end=d", &["b", "c"]),
        ("start=b", &["b", "c", "d", "e"]),
        ("end=c", &["a", "b"]),
        ("start=bb&end=dd", &["c", "d"]),
        ("start=c&end=c", &[]),
        ("start=d&end=b", &[]),
        ("start=f", &[]),
        ("reverse=1", &["e", "d", "c", "b", "a"]),
        ("start=b&end=d&reverse=1", &["c", "b"]),
        ("start=d&reverse=true", &["e", "d"]),
        ("end=c&reverse=1", &["b", "a"]),
        ("start=c&end=c&reverse=1", &[]),
        ("reverse=0", &["a", "b", "c", "d", "e"]),
    ] {
        assert_lists(c, query, expected).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_lists_the_keys_that_begin_with_it() {
    let server = TestServer::start().await;
    let c = &server.client;
    let all = [
        "use", "user", "user/1", "user/10", "user/2", "users", "usex", "v", "é", "éa", "f",
    ];
    seed_keys(c, &all).await;
    for (query, expected) in [
        ("prefix=user/", &["user/1", "user/10", "user/2"][..]),
        ("prefix=user%2F", &["user/1", "user/10", "user/2"]),
        (
            "prefix=user",
            &["user", "user/1", "user/10", "user/2", "users"],
        ),
        ("prefix=user/&reverse=1", &["user/2", "user/10", "user/1"]),
        ("prefix=%C3%A9", &["é", "éa"]),
        ("prefix=u&limit=2", &["use", "user"]),
        ("prefix=nothing", &[]),
        ("prefix=zz&reverse=1", &[]),
    ] {
        assert_lists(c, query, expected).await;
    }
    for query in [
        "prefix=u&start=a",
        "prefix=u&end=z",
        "prefix=u&start=a&end=z",
    ] {
        assert_bad_query(c, query).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_defaults_to_100_and_takes_1_to_1000() {
    let server = TestServer::start().await;
    let c = &server.client;
    let all = numbered("k", 150);
    seed_strings(c, &all).await;

    let first = list(c, "").await;
    assert_eq!(keys(&first), all[..100]);
    cursor(&first);
    let sizes: Vec<usize> = walk(c, "").await.iter().map(Vec::len).collect();
    assert_eq!(sizes, [100, 50]);

    assert_eq!(list_keys(c, "limit=1").await, all[..1]);
    let whole = list(c, "limit=1000").await;
    assert_eq!(keys(&whole), all);
    assert!(whole["next_cursor"].is_null());

    for limit in ["0", "1001", "abc", "-1", "1.5", "1e2", "%201"] {
        assert_bad_query(c, &format!("limit={limit}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_are_full_entries_unless_keys_only() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_text(c, "text", "hello").await;
    put_text(c, "text", "hello again").await;
    let binary = put_json(
        c,
        "bin",
        &json!({"value_base64": STANDARD.encode([0xffu8, 0])}),
        &[],
    )
    .await;
    expect_json(&binary, StatusCode::CREATED);
    put_text(c, "empty", "").await;

    let page = list(c, "").await;
    let items = page["items"].as_array().expect("items");
    assert_eq!(keys(&page), ["bin", "empty", "text"]);
    for item in items {
        let key = item["key"].as_str().expect("key");
        assert_eq!(item, &entry(c, key).await, "the listed {key} is its entry");
    }
    assert_eq!(items[0]["value_base64"], "/wA=");
    assert_eq!(items[2]["value"], "hello again");

    for query in ["keys_only=1", "keys_only=true&reverse=1"] {
        let page = list(c, query).await;
        for item in page["items"].as_array().expect("items") {
            assert_fields(item, &ENTRY_META);
            let mut full = entry(c, item["key"].as_str().expect("key")).await;
            let full = full.as_object_mut().expect("entry object");
            full.remove("value");
            full.remove("value_base64");
            assert_eq!(item.as_object(), Some(&*full));
        }
    }
    assert_bad_query(c, "keys_only=yes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_ordered_by_their_bytes() {
    let server = TestServer::start().await;
    let c = &server.client;
    let ordered = [
        "Z", "a", "a/", "a0", "ab", "b", "z", "~", "\u{7f}", "é", "éa", "ê", "日",
    ];
    let mut shuffled = ordered.to_vec();
    shuffled.reverse();
    shuffled.swap(2, 9);
    seed_keys(c, &shuffled).await;
    assert_lists(c, "", &ordered).await;
    let mut reversed = ordered.to_vec();
    reversed.reverse();
    assert_lists(c, "reverse=1", &reversed).await;
    assert_lists(c, "start=a&end=b", &["a", "a/", "a0", "ab"]).await;
    assert_lists(c, "start=%7E", &["~", "\u{7f}", "é", "éa", "ê", "日"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_walk_every_key_exactly_once() {
    let server = TestServer::start().await;
    let c = &server.client;
    let mut all = numbered("k", 30);
    all.extend(numbered("p/", 17));
    all.sort();
    seed_strings(c, &all).await;

    type Filter = fn(&str) -> bool;
    let cases: [(&str, usize, Filter); 5] = [
        ("", 7, |_| true),
        ("", 47, |_| true),
        ("prefix=p/", 5, |k| k.starts_with("p/")),
        ("start=k010&end=k025", 4, |k| ("k010".."k025").contains(&k)),
        ("keys_only=1", 10, |_| true),
    ];
    for (query, limit, filter) in cases {
        let expected: Vec<String> = all.iter().filter(|k| filter(k)).cloned().collect();
        for reverse in [false, true] {
            let query = format!("{query}&limit={limit}&reverse={}", u8::from(reverse));
            let pages = walk(c, &query).await;
            // Full pages until the last, which is not empty and ends the walk.
            let (last, full) = pages.split_last().expect("a page");
            assert!(full.iter().all(|p| p.len() == limit), "?{query}: {pages:?}");
            assert!(
                !last.is_empty() && last.len() <= limit,
                "?{query}: {pages:?}"
            );
            let mut want = expected.clone();
            if reverse {
                want.reverse();
            }
            assert_eq!(pages.concat(), want, "?{query}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_cursor_is_null_on_empty_and_last_pages() {
    let server = TestServer::start().await;
    let c = &server.client;
    for query in ["", "reverse=1", "prefix=a", "start=a&end=b"] {
        let page = list(c, query).await;
        // Nothing was ever written: the store is at revision 0.
        assert_eq!(
            page,
            json!({"items": [], "next_cursor": null, "revision": 0}),
            "?{query}"
        );
    }
    seed_keys(c, &["a", "b", "c", "d"]).await;
    // The server knows that nothing follows a page that ends the range.
    for query in [
        "limit=4",
        "limit=2&start=c",
        "limit=2&end=b&reverse=1",
        "prefix=d&limit=1",
    ] {
        assert!(list(c, query).await["next_cursor"].is_null(), "?{query}");
    }
    // A cursor whose continuation has emptied meanwhile gives an empty last page.
    let first = list(c, "limit=3").await;
    assert_eq!(keys(&first), ["a", "b", "c"]);
    assert_eq!(
        delete(c, "/v1/kv/d", &[]).await.status,
        StatusCode::NO_CONTENT
    );
    let rest = list(c, &format!("limit=3&cursor={}", cursor(&first))).await;
    // The page was read after the delete, one revision past the first page.
    let after_delete = first["revision"].as_u64().expect("revision") + 1;
    assert_eq!(
        rest,
        json!({"items": [], "next_cursor": null, "revision": after_delete})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_only_continue_their_own_range() {
    let server = TestServer::start().await;
    let c = &server.client;
    seed_keys(c, &["p/1", "p/2", "p/3", "q/1", "q/2"]).await;
    let forward = cursor(&list(c, "prefix=p/&limit=1").await);
    let backward = cursor(&list(c, "prefix=p/&limit=1&reverse=1").await);
    let bounded = cursor(&list(c, "start=p/&end=q/&limit=1").await);

    // Limit and keys_only may change between pages.
    let next = list(
        c,
        &format!("prefix=p/&limit=5&keys_only=1&cursor={forward}"),
    )
    .await;
    assert_eq!(keys(&next), ["p/2", "p/3"]);
    let next = list(c, &format!("prefix=p/&reverse=1&cursor={backward}")).await;
    assert_eq!(keys(&next), ["p/2", "p/1"]);
    let next = list(c, &format!("start=p/&end=q/&limit=1&cursor={bounded}")).await;
    assert_eq!(keys(&next), ["p/2"]);

    for query in [
        format!("cursor={forward}"),
        format!("prefix=q/&cursor={forward}"),
        format!("prefix=p&cursor={forward}"),
        format!("prefix=p/&reverse=1&cursor={forward}"),
        format!("start=p/&cursor={forward}"),
        format!("prefix=p/&cursor={backward}"),
        format!("start=p/&end=q/&reverse=1&cursor={bounded}"),
        format!("start=p/&cursor={bounded}"),
        format!("end=q/&cursor={bounded}"),
        format!("start=p/&end=r/&cursor={bounded}"),
        format!("prefix=p/&cursor={bounded}"),
        // Not issued by the server at all.
        "cursor=garbage!".to_owned(),
        "cursor=AAAA".to_owned(),
        "cursor=AQ".to_owned(),
        "cursor=%FF".to_owned(),
        format!("prefix=p/&cursor={forward}="),
    ] {
        assert_bad_query(c, &query).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_cursor_cannot_read_outside_its_range() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let server = TestServer::start().await;
    let c = &server.client;
    seed_keys(c, &["p/1", "p/2", "p/3", "q/secret"]).await;
    let issued = cursor(&list(c, "prefix=p/&limit=1").await);
    let mut raw = URL_SAFE_NO_PAD.decode(&issued).expect("base64url");
    // The key "p/1" sits after the 2-byte header: point it at "q/1".
    assert_eq!(&raw[2..5], b"p/1");
    raw[2] = b'q';
    let forged = URL_SAFE_NO_PAD.encode(&raw);
    assert_bad_query(c, &format!("prefix=p/&cursor={forged}")).await;
    // Nor may a forged cursor widen an unbounded walk from another key.
    let issued = cursor(&list(c, "limit=1").await);
    let mut raw = URL_SAFE_NO_PAD.decode(&issued).expect("base64url");
    raw[2] = b'q';
    assert_bad_query(c, &format!("cursor={}", URL_SAFE_NO_PAD.encode(&raw))).await;
    // The untouched cursor still works.
    assert_lists(c, &format!("cursor={issued}"), &["p/2", "p/3", "q/secret"]).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_sharing_a_cursor_secret_accept_each_others_cursors() {
    use kvstore::server::CursorKey;
    use kvstore::client::ClientOptions;
    use kvstore::server::Security;
    let secured = |secret: &[u8]| {
        let mut security = Security::default();
        security.cursor_key = Some(CursorKey::new(secret).expect("key"));
        security
    };
    let shared = b"a secret shared by every server";
    let options = ClientOptions::default();
    let a = TestServer::start_secured(ServerConfig::default(), secured(shared), &options).await;
    let b = TestServer::start_secured(ServerConfig::default(), secured(shared), &options).await;
    let other = TestServer::start_secured(
        ServerConfig::default(),
        secured(b"another secret, not shared"),
        &options,
    )
    .await;
    for server in [&a, &b, &other] {
        seed_keys(&server.client, &["k1", "k2", "k3"]).await;
    }
    let issued = cursor(&list(&a.client, "limit=1").await);
    assert_lists(&b.client, &format!("cursor={issued}"), &["k2", "k3"]).await;
    assert_bad_query(&other.client, &format!("cursor={issued}")).await;
    for server in [a, b, other] {
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_walk_lists_each_key_that_existed_throughout_exactly_once() {
    let server = TestServer::start().await;
    let c = &server.client;
    let stable: Vec<String> = (0..40).map(|i| format!("k{:03}", i * 2)).collect();
    seed_strings(c, &stable).await;
    for reverse in [false, true] {
        let mut seen = Vec::new();
        let mut cursor_param = String::new();
        for round in 0u32.. {
            let page = list(
                c,
                &format!("limit=3&reverse={}{cursor_param}", u8::from(reverse)),
            )
            .await;
            seen.extend(keys(&page));
            let Some(next) = page["next_cursor"].as_str() else {
                break;
            };
            cursor_param = format!("&cursor={next}");
            // Between pages, other keys come and go before, at and after the
            // cursor (odd numbers; the stable keys are even).
            let odd = |n: u32| format!("k{:03}", (n % 40) * 2 + 1);
            put_text(c, &odd(round * 7), "new").await;
            let last = seen.last().expect("a key").clone();
            put_text(c, &format!("{last}x"), "new").await;
            let gone = delete(c, &Client::key_path(&odd(round * 11 + 3)), &[]).await;
            assert!(matches!(
                gone.status,
                StatusCode::NO_CONTENT | StatusCode::NOT_FOUND
            ));
        }
        let listed: Vec<&String> = seen.iter().filter(|k| stable.contains(k)).collect();
        let mut want: Vec<&String> = stable.iter().collect();
        if reverse {
            want.reverse();
        }
        assert_eq!(listed, want, "reverse={reverse}");
        let mut ordered = seen.clone();
        ordered.sort();
        if reverse {
            ordered.reverse();
        }
        ordered.dedup();
        assert_eq!(seen, ordered, "in order, each once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_ends_early_at_4_mib_of_values() {
    let mut config = ServerConfig::default();
    config.limits.max_value_bytes = 6 << 20;
    let server = TestServer::start_with(config, |_| {}).await;
    let c = &server.client;
    // Five values just over 1 MiB, then one over the page cap on its own.
    let mut sizes = vec![(1 << 20) + 1; 5];
    sizes.push(5 << 20);
    let names: Vec<String> = numbered("big", sizes.len());
    for (key, size) in names.iter().zip(&sizes) {
        let response = put_raw(c, key, vec![b'x'; *size]).await;
        expect_json(&response, StatusCode::CREATED);
    }
    for reverse in [false, true] {
        let query = format!("reverse={}", u8::from(reverse));
        let pages = walk(c, &query).await;
        assert!(pages.len() > 1, "10 MiB of values on one page");
        for page in &pages {
            let bytes: usize = page
                .iter()
                .map(|k| sizes[names.iter().position(|n| n == k).expect("a seeded key")])
                .sum();
            assert!(!page.is_empty(), "an empty page: {pages:?}");
            assert!(page.len() == 1 || bytes <= PAGE_VALUE_BYTES, "{pages:?}");
        }
        let mut want = names.clone();
        if reverse {
            want.reverse();
        }
        assert_eq!(pages.concat(), want, "?{query}");
    }
    // Without values, the cap does not apply.
    let page = list(c, "keys_only=1").await;
    assert_eq!(keys(&page), names);
    assert!(page["next_cursor"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_range_parameters_are_refused() {
    let server = TestServer::start().await;
    let c = &server.client;
    seed_keys(c, &["a"]).await;
    let long = "a".repeat(1025);
    for query in [
        "foo=1".to_owned(),
        "limit=1&limit=2".to_owned(),
        "reverse=2".to_owned(),
        "start=%00".to_owned(),
        "end=a%00".to_owned(),
        "prefix=%00".to_owned(),
        "start=%zz".to_owned(),
        "prefix=%FF".to_owned(),
        format!("start={long}"),
        format!("prefix={long}"),
        "raw=1".to_owned(),
    ] {
        assert_bad_query(c, &query).await;
    }
}

}

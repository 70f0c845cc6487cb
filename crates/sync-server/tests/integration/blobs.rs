//! The blob API over HTTP: chunked uploads with offsets, status, downloads
//! with `Range`, limits, namespaces, and uploads surviving a restart.

use std::io::Read;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::support::{fail, Backend, Database, Server, TestResult, WAIT};

const KEY: &str = "blob-key-0123456789";
const OTHER: &str = "other-blob-key-0123456789";

fn sha(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Blobs {
    client: reqwest::Client,
    base: String,
    key: String,
}

impl Blobs {
    fn new(server: &Server, key: &str) -> Self {
        Blobs {
            client: reqwest::Client::builder()
                .timeout(WAIT)
                .build()
                .expect("client"),
            base: server.base.clone(),
            key: key.to_owned(),
        }
    }

    async fn put(
        &self,
        hash: &str,
        query: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Value), Box<dyn std::error::Error + Send + Sync>> {
        let answer = self
            .client
            .put(format!("{}/blobs/{hash}{query}", self.base))
            .bearer_auth(&self.key)
            .body(body)
            .send()
            .await?;
        let status = answer.status().as_u16();
        Ok((status, answer.json().await?))
    }

    async fn status(&self, hash: &str) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let answer = self
            .client
            .get(format!("{}/blobs/{hash}/status", self.base))
            .bearer_auth(&self.key)
            .send()
            .await?;
        if answer.status() != 200 {
            return Err(fail(format!("status answered {}", answer.status())));
        }
        Ok(answer.json().await?)
    }

    fn get(&self, hash: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}/blobs/{hash}", self.base))
            .bearer_auth(&self.key)
    }
}

pub async fn chunked_upload_and_ranged_download(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    db.add_key("main", KEY)?;
    db.add_key("other", OTHER)?;
    let blob_dir = db.dir().join("assets");
    let blob_arg = blob_dir.display().to_string();
    let server = db.start(&[
        "--blob-dir",
        &blob_arg,
        "--max-blob-bytes",
        "200000",
        "--max-blob-chunk-bytes",
        "65536",
    ])?;
    let blobs = Blobs::new(&server, KEY);
    // Pseudo-random bytes (xorshift): they do not compress, like media.
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let data: Vec<u8> = (0..150_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let hash = sha(&data);

    assert_eq!(
        blobs.status(&hash).await?,
        json!({"sha256": hash, "size": null, "received": 0, "complete": false})
    );
    let (status, answer) = blobs
        .put(&hash, "?size=150000&offset=0", data[..60_000].to_vec())
        .await?;
    assert_eq!(
        (status, &answer["received"]),
        (200, &json!(60_000)),
        "{answer}"
    );
    // A chunk at the wrong offset is refused and says where to go on.
    let (status, answer) = blobs
        .put(&hash, "?size=150000&offset=0", data[..10].to_vec())
        .await?;
    assert_eq!(status, 409);
    assert_eq!(answer["received"], 60_000);
    let (status, _) = blobs
        .put(&hash, "?size=150000&offset=60000", data[60_000..].to_vec())
        .await?;
    assert_eq!(status, 413, "chunk over --max-blob-chunk-bytes");
    let (status, answer) = blobs
        .put(
            &hash,
            "?size=150000&offset=60000",
            data[60_000..120_000].to_vec(),
        )
        .await?;
    assert_eq!((status, &answer["complete"]), (200, &json!(false)));
    assert_eq!(blobs.status(&hash).await?["received"], 120_000);
    let (status, answer) = blobs
        .put(
            &hash,
            "?size=150000&offset=120000",
            data[120_000..].to_vec(),
        )
        .await?;
    assert_eq!(status, 200);
    assert_eq!(
        answer,
        json!({"sha256": hash, "size": 150_000, "received": 150_000, "complete": true})
    );

    // Whole, ranged, and headers only.
    let whole = blobs.get(&hash).send().await?;
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.headers()["content-length"], "150000");
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert_eq!(whole.headers()["etag"], format!("\"{hash}\"").as_str());
    assert_eq!(whole.bytes().await?.as_ref(), &data[..]);
    let tail = blobs
        .get(&hash)
        .header("range", "bytes=149990-")
        .send()
        .await?;
    assert_eq!(tail.status(), 206);
    assert_eq!(
        tail.headers()["content-range"],
        "bytes 149990-149999/150000"
    );
    assert_eq!(tail.bytes().await?.as_ref(), &data[149_990..]);
    let beyond = blobs
        .get(&hash)
        .header("range", "bytes=150000-")
        .send()
        .await?;
    assert_eq!(beyond.status(), 416);
    assert_eq!(beyond.headers()["content-range"], "bytes */150000");
    let head = blobs
        .client
        .head(format!("{}/blobs/{hash}", blobs.base))
        .bearer_auth(KEY)
        .send()
        .await?;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "150000");

    // Compressible content is gzip-compressed for clients that ask; ranges never are.
    let text = b"Once upon a time, in a lantern-lit library. ".repeat(1400);
    let text_hash = sha(&text);
    let (status, _) = blobs
        .put(
            &text_hash,
            &format!("?size={}&offset=0", text.len()),
            text.clone(),
        )
        .await?;
    assert_eq!(status, 200);
    let packed = blobs
        .get(&text_hash)
        .header("accept-encoding", "gzip")
        .send()
        .await?;
    assert_eq!(packed.headers()["content-encoding"], "gzip");
    let packed = packed.bytes().await?;
    assert!(packed.len() * 10 < text.len());
    let mut unpacked = Vec::new();
    flate2::read::GzDecoder::new(&packed[..]).read_to_end(&mut unpacked)?;
    assert_eq!(unpacked, text);
    let ranged = blobs
        .get(&text_hash)
        .header("accept-encoding", "gzip")
        .header("range", "bytes=10-")
        .send()
        .await?;
    assert_eq!(ranged.status(), 206);
    assert!(ranged.headers().get("content-encoding").is_none());
    let noise = blobs
        .get(&hash)
        .header("accept-encoding", "gzip")
        .send()
        .await?;
    assert!(
        noise.headers().get("content-encoding").is_none(),
        "incompressible content goes as is"
    );

    // Refusals.
    let (status, answer) = blobs
        .put(&sha(b"abd"), "?size=3&offset=0", b"abc".to_vec())
        .await?;
    assert_eq!(status, 422, "{answer}");
    let (status, _) = blobs
        .put(&hash, "?size=999999&offset=0", Vec::new())
        .await?;
    assert_eq!(status, 413, "over --max-blob-bytes");
    let (status, _) = blobs
        .put("abc", "?size=3&offset=0", b"abc".to_vec())
        .await?;
    assert_eq!(status, 400);
    let (status, _) = blobs
        .put(&sha(b"abc"), "?offset=0", b"abc".to_vec())
        .await?;
    assert_eq!(status, 400);
    let anonymous = blobs
        .client
        .get(format!("{}/blobs/{hash}", blobs.base))
        .send()
        .await?;
    assert_eq!(anonymous.status(), 401);

    // Another key's namespace does not see the blob until it uploads it too.
    let other = Blobs::new(&server, OTHER);
    assert_eq!(other.get(&hash).send().await?.status(), 404);
    assert_eq!(other.status(&hash).await?["received"], 0);
    let (status, answer) = other
        .put(&hash, "?size=150000&offset=0", data[..60_000].to_vec())
        .await?;
    assert_eq!((status, &answer["received"]), (200, &json!(60_000)));
    assert!(blob_dir
        .join("objects")
        .join(&hash[..2])
        .join(&hash)
        .exists());
    Ok(())
}

pub async fn uploads_survive_a_restart(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    db.add_key("main", KEY)?;
    let blob_arg = db.dir().join("assets").display().to_string();
    let data = vec![42u8; 100_000];
    let hash = sha(&data);
    {
        let server = db.start(&["--blob-dir", &blob_arg])?;
        let blobs = Blobs::new(&server, KEY);
        let (status, _) = blobs
            .put(&hash, "?size=100000&offset=0", data[..40_000].to_vec())
            .await?;
        assert_eq!(status, 200);
    }
    let server = db.start(&["--blob-dir", &blob_arg])?;
    let blobs = Blobs::new(&server, KEY);
    assert_eq!(blobs.status(&hash).await?["received"], 40_000);
    let (status, answer) = blobs
        .put(&hash, "?size=100000&offset=40000", data[40_000..].to_vec())
        .await?;
    assert_eq!((status, &answer["complete"]), (200, &json!(true)));
    assert_eq!(blobs.get(&hash).send().await?.bytes().await?.len(), 100_000);
    Ok(())
}

pub async fn blobs_are_off_without_a_directory(backend: Backend) -> TestResult {
    let db = Database::new(backend).await?;
    db.add_key("main", KEY)?;
    let server = db.start(&[])?;
    let blobs = Blobs::new(&server, KEY);
    let answer = blobs.get(&sha(b"x")).send().await?;
    assert_eq!(answer.status(), 501);
    let body: Value = answer.json().await?;
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("--blob-dir")),
        "{body}"
    );
    Ok(())
}

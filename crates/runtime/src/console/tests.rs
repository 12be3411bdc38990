use super::*;

fn rec(stream: LogStream, log: &str) -> LogRecord {
    LogRecord {
        time: now_rfc3339(),
        stream,
        log: log.into(),
    }
}

/// Runs the shim's loop over two pipes fed by `feed`, into `dir`.
fn pump_with(dir: &Path, max: u64, feed: impl FnOnce(File, File) + Send + 'static) {
    let (out_r, out_w) = nix::unistd::pipe().unwrap();
    let (err_r, err_w) = nix::unistd::pipe().unwrap();
    let writer = std::thread::spawn(move || feed(File::from(out_w), File::from(err_w)));
    let mut log = LogWriter::open(dir, max).unwrap();
    pump(&mut log, [File::from(out_r), File::from(err_r)]).unwrap();
    writer.join().unwrap();
}

#[test]
fn lines_of_both_streams_become_records_in_order_and_unfinished_ones_are_kept() {
    let d = tempfile::tempdir().unwrap();
    pump_with(d.path(), DEFAULT_MAX_BYTES, |mut out, mut err| {
        out.write_all(b"one\ntw").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        out.write_all(b"o\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        err.write_all(b"oops\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        out.write_all(b"no newline at the end").unwrap();
    });
    let got: Vec<(LogStream, String)> = read(d.path(), None, None)
        .unwrap()
        .into_iter()
        .map(|r| (r.stream, r.log))
        .collect();
    assert_eq!(
        got,
        vec![
            (LogStream::Stdout, "one\n".into()),
            (LogStream::Stdout, "two\n".into()),
            (LogStream::Stderr, "oops\n".into()),
            (LogStream::Stdout, "no newline at the end".into()),
        ]
    );
    assert_eq!(read(d.path(), Some(1), None).unwrap().len(), 1);
}

#[test]
fn a_long_line_is_cut_and_bytes_that_are_not_utf8_are_replaced() {
    let mut p = vec![b'x'; MAX_RECORD_TEXT + 10];
    p.extend_from_slice(b"\n\xff\n");
    let pieces = take_lines(&mut p);
    assert_eq!(pieces.len(), 3);
    assert_eq!(pieces[0].len(), MAX_RECORD_TEXT);
    assert_eq!(pieces[1].len(), 11);
    assert!(p.is_empty());
    let d = tempfile::tempdir().unwrap();
    pump_with(d.path(), DEFAULT_MAX_BYTES, |mut out, _| {
        out.write_all(b"caf\xc3\xa9 \xff\n").unwrap();
    });
    assert_eq!(
        read(d.path(), None, None).unwrap()[0].log,
        "caf\u{e9} \u{fffd}\n"
    );
}

#[test]
fn the_log_starts_again_past_its_limit_and_keeps_one_older_file() {
    let d = tempfile::tempdir().unwrap();
    pump_with(d.path(), 4096, |mut out, _| {
        for i in 0..200 {
            out.write_all(format!("line {i:04}\n").as_bytes()).unwrap();
        }
    });
    for f in [CURRENT, ROTATED] {
        let len = std::fs::metadata(d.path().join(f)).unwrap().len();
        assert!(len <= 4096, "{f} is {len} bytes");
    }
    let all = read(d.path(), None, None).unwrap();
    assert_eq!(all.last().unwrap().log, "line 0199\n");
    // What is left is the newest, in order, without a gap.
    let first: usize = all[0].log[5..9].parse().unwrap();
    for (k, r) in all.iter().enumerate() {
        assert_eq!(r.log, format!("line {:04}\n", first + k));
    }
    assert!(first > 0, "older lines were dropped with the oldest file");
}

#[test]
fn history_moves_whole_records_and_drops_what_is_not_one() {
    let from = tempfile::tempdir().unwrap();
    let mut h = Vec::new();
    for i in 0..50 {
        serde_json::to_writer(&mut h, &rec(LogStream::Stdout, &format!("old {i}\n"))).unwrap();
        h.push(b'\n');
    }
    std::fs::write(from.path().join(HISTORY), &h).unwrap();
    let mut cur = Vec::new();
    serde_json::to_writer(&mut cur, &rec(LogStream::Stderr, "new\n")).unwrap();
    cur.extend_from_slice(b"\n{\"time\":\"half a rec");
    std::fs::write(from.path().join(CURRENT), &cur).unwrap();

    let all = history_payload(from.path(), usize::MAX).unwrap();
    let to = tempfile::tempdir().unwrap();
    let mut hostile = all.clone();
    hostile.extend_from_slice(b"not json\n{\"stream\":\"stdin\",\"log\":\"x\",\"time\":\"t\"}\n");
    assert_eq!(write_history(to.path(), &hostile).unwrap(), 51);
    let got = read(to.path(), None, None).unwrap();
    assert_eq!(got.first().unwrap().log, "old 0\n");
    assert_eq!(got.last().unwrap().log, "new\n");

    // Capped: the newest records, from a record's start.
    let capped = history_payload(from.path(), 300).unwrap();
    assert!(capped.len() <= 300);
    let to2 = tempfile::tempdir().unwrap();
    let n = write_history(to2.path(), &capped).unwrap();
    assert!(n > 0 && n < 51);
    assert_eq!(
        read(to2.path(), None, None).unwrap().last().unwrap().log,
        "new\n"
    );
}

#[test]
fn a_follower_reads_whole_records_from_where_it_left() {
    let d = tempfile::tempdir().unwrap();
    let mut w = LogWriter::open(d.path(), DEFAULT_MAX_BYTES).unwrap();
    w.write(LogStream::Stdout, b"a\n").unwrap();
    let (got, at) = read_since(d.path(), 0).unwrap();
    assert_eq!(got.len(), 1);
    std::fs::OpenOptions::new()
        .append(true)
        .open(d.path().join(CURRENT))
        .unwrap()
        .write_all(b"{\"time\":\"")
        .unwrap();
    let (none, at2) = read_since(d.path(), at).unwrap();
    assert!(none.is_empty());
    assert_eq!(at2, at);
    assert_eq!(current_len(d.path()), at + 9);
}

use super::*;

fn span(label: &str, start_ms: f64, end_ms: f64) -> Span {
    Span {
        label: label.to_string(),
        start_ms,
        end_ms,
    }
}

fn panel(title: &str, phases: Vec<Span>) -> Panel {
    let samples = (-500..1500)
        .map(|i| (f64::from(i), 0.3 + f64::from(i % 7) * 0.1))
        .collect();
    Panel {
        title: title.to_string(),
        samples,
        phases,
        largest_gap: Some((100.0, 220.0)),
        note: "downtime 120.0 ms, total 0.9 s, 270 MB".to_string(),
    }
}

fn two_panels() -> Vec<Panel> {
    vec![
        panel(
            "Ferry",
            vec![
                span("dump", 0.0, 48.9),
                span("transfer", 48.9, 300.0),
                span("restore", 300.0, 400.0),
                span("commit", 400.0, 400.2),
            ],
        ),
        panel(
            "baseline (runc + CRIU by hand)",
            vec![
                span("checkpoint", 0.0, 350.0),
                span("copy", 350.0, 700.0),
                span("restore", 700.0, 900.0),
                span("mystery", 900.0, 950.0),
            ],
        ),
    ]
}

/// The (x, y) points of the samples' path.
fn path_points(svg: &str) -> Vec<(f64, f64)> {
    let start = svg.find(r#"class="rtt" d=""#).expect("samples path") + r#"class="rtt" d=""#.len();
    let d = &svg[start..start + svg[start..].find('"').unwrap()];
    let nums: Vec<f64> = d
        .split([' ', 'M', 'L'])
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("number"))
        .collect();
    assert_eq!(nums.len() % 2, 0, "{d}");
    nums.chunks(2).map(|c| (c[0], c[1])).collect()
}

fn assert_clean(svg: &str) {
    assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
    assert!(svg.ends_with("</svg>\n"));
    assert!(svg.contains(r#"xmlns="http://www.w3.org/2000/svg""#));
    let lower = svg.to_ascii_lowercase();
    assert!(!lower.contains("nan"), "NaN in output");
    assert!(!lower.contains("inf"), "inf in output");
    assert!(!lower.contains("<script"));
}

#[test]
fn renders_phases_and_legend() {
    let panels = two_panels();
    let svg = render("scenario idle", &panels, window(&panels, 200.0, 500.0));
    assert_clean(&svg);
    let phase_rects = svg.matches(r#"<rect class="phase""#).count();
    assert_eq!(phase_rects, 8, "one rect per phase per panel");
    let legend: Vec<&str> = svg
        .lines()
        .filter(|l| l.contains(r#"class="legend""#))
        .collect();
    assert_eq!(legend.len(), 8);
    for p in &panels {
        for s in &p.phases {
            assert!(
                legend.iter().any(|l| l.contains(&format!(">{} ", s.label))),
                "{} not in legend",
                s.label
            );
        }
    }
    assert!(svg.contains(">dump 48.9 ms</text>"));
    assert!(svg.contains(">commit 0.2 ms</text>"));
    assert!(svg.contains(">gap 120.0 ms</text>"));
    assert!(svg.contains("Ferry"));
    assert!(svg.contains("baseline (runc + CRIU by hand)"));
    // The tiny commit phase is still at least 1 px wide.
    let commit = svg
        .lines()
        .find(|l| l.contains("<title>commit "))
        .expect("commit rect");
    let w: f64 = commit
        .split("width=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(w >= 1.0, "{commit}");
    // Known labels get their fixed colour, others one from the fallback palette.
    assert!(svg.contains(&format!(
        r#"fill="{}" fill-opacity="0.22"><title>dump"#,
        phase_color("dump")
    )));
    assert!(FALLBACK_COLORS.contains(&phase_color("mystery")));
    // The log axis reaches 10 ms at least and labels its decades.
    for label in ["0.1 ms", "1 ms", "10 ms"] {
        assert!(svg.contains(&format!(">{label}</text>")), "{label}");
    }
}

#[test]
fn repeated_labels_merge_in_legend() {
    let panels = vec![panel(
        "pre-copy",
        vec![
            span("copy", 0.0, 100.0),
            span("copy", 100.0, 150.0),
            span("dump", 150.0, 160.0),
        ],
    )];
    let svg = render("t", &panels, window(&panels, 100.0, 100.0));
    assert_clean(&svg);
    assert_eq!(svg.matches(r#"<rect class="phase""#).count(), 3);
    assert!(svg.contains(">copy 150.0 ms (2\u{00d7})</text>"));
}

#[test]
fn escapes_text() {
    let mut panels = two_panels();
    panels[0].title = "a \"b\" 'c'".to_string();
    panels[0].note = "x & y".to_string();
    panels[0].phases[0].label = "<dump>".to_string();
    let svg = render("<&> title", &panels, (-100.0, 1000.0));
    assert_clean(&svg);
    assert!(svg.contains("&lt;&amp;&gt; title"));
    assert!(!svg.contains("<&>"));
    assert!(svg.contains("a &quot;b&quot; &apos;c&apos;"));
    assert!(svg.contains("x &amp; y"));
    assert!(svg.contains("&lt;dump&gt; 48.9 ms"));
    assert_eq!(Esc("a\u{1}b\nc").to_string(), "ab c");
}

#[test]
fn empty_and_degenerate_inputs_render() {
    let empty = Panel::default();
    for win in [
        (0.0, 1000.0),
        (5.0, 5.0),
        (10.0, -10.0),
        (f64::NAN, 3.0),
        (f64::NEG_INFINITY, f64::INFINITY),
        (-1e300, 1e300),
    ] {
        let svg = render("", std::slice::from_ref(&empty), win);
        assert_clean(&svg);
        assert!(!svg.contains(r#"class="rtt""#));
    }
    assert_clean(&render("nothing", &[], (0.0, 1.0)));

    // Non-finite and out-of-range values everywhere.
    let weird = Panel {
        title: "weird".to_string(),
        samples: vec![
            (f64::NAN, 1.0),
            (1.0, f64::NAN),
            (2.0, f64::INFINITY),
            (3.0, -5.0),
            (4.0, 0.0),
            (5.0, 1e12),
            (f64::INFINITY, 1.0),
            (6.0, 1.0),
        ],
        phases: vec![
            span("dump", f64::NAN, 3.0),
            span("restore", 4.0, 2.0),
            span("commit", -1e9, -1e8),
            span("copy", 1e9, f64::INFINITY),
        ],
        largest_gap: Some((f64::NEG_INFINITY, 2.0)),
        note: String::new(),
    };
    let win = window(std::slice::from_ref(&weird), 1.0, 1.0);
    assert_eq!(win, (-1e9 - 1.0, 5.0));
    assert_clean(&render("weird", std::slice::from_ref(&weird), win));
    let svg = render("weird", std::slice::from_ref(&weird), (0.0, 10.0));
    assert_clean(&svg);
    // Only "restore" (reversed, finite) lies in the window; "commit" is far outside.
    assert_eq!(svg.matches(r#"<rect class="phase""#).count(), 1);
    for (x, y) in path_points(&svg) {
        assert!(
            (0.0..=PLOT_W).contains(&x) && (0.0..=PLOT_H).contains(&y),
            "{x} {y}"
        );
    }
}

#[test]
fn decimation_keeps_the_spike() {
    for spike_at in [0_usize, 12_345, 77_777, 99_999] {
        let samples: Vec<(f64, f64)> = (0..100_000)
            .map(|i| (i as f64 / 10.0, if i == spike_at { 500.0 } else { 1.0 }))
            .collect();
        let panels = vec![Panel {
            title: "spike".to_string(),
            samples,
            ..Panel::default()
        }];
        let win = window(&panels, 0.0, 0.0);
        assert_eq!(win, (0.0, 9999.9));
        let svg = render("spike", &panels, win);
        assert_clean(&svg);
        assert!(
            svg.contains(">1 s</text>"),
            "axis goes up to 1 s for a 500 ms spike"
        );
        let points = path_points(&svg);
        assert!(points.len() <= 4000, "{} points", points.len());
        let spike_y = rt_to_y(500.0, 1000.0);
        let base_y = rt_to_y(1.0, 1000.0);
        let top = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        assert!(
            (top - spike_y).abs() <= 0.051,
            "spike at {spike_at}: top {top}, want {spike_y}"
        );
        assert!(points
            .iter()
            .all(|p| (p.1 - spike_y).abs() <= 0.051 || (p.1 - base_y).abs() <= 0.051));
        let spike_x = t_to_x(spike_at as f64 / 10.0, win);
        assert!(points
            .iter()
            .any(|p| (p.1 - spike_y).abs() <= 0.051 && (p.0 - spike_x).abs() <= 0.051));
    }
}

#[test]
fn line_breaks_at_gaps() {
    let samples: Vec<(f64, f64)> = (0..2000)
        .filter(|i| !(500..1000).contains(i))
        .map(|i| (f64::from(i), 1.0))
        .collect();
    let panels = vec![Panel {
        samples,
        largest_gap: Some((499.0, 1000.0)),
        ..Panel::default()
    }];
    let svg = render("gap", &panels, (0.0, 2000.0));
    assert_clean(&svg);
    let start = svg.find(r#"class="rtt" d=""#).unwrap();
    let d = &svg[start..start + svg[start..].find("\" fill").unwrap()];
    assert_eq!(d.matches('M').count(), 2, "{d}");
    assert!(svg.contains(">gap 501.0 ms</text>"));
}

#[test]
fn y_mapping_is_log() {
    assert_eq!(rt_to_y(0.1, 1000.0), PLOT_H);
    assert_eq!(rt_to_y(1000.0, 1000.0), 0.0);
    assert!((rt_to_y(1.0, 1000.0) - PLOT_H * 0.75).abs() < 1e-9);
    assert_eq!(rt_to_y(0.0, 1000.0), PLOT_H);
    assert_eq!(rt_to_y(f64::NAN, 1000.0), PLOT_H);
    assert_eq!(rt_to_y(1e9, 1000.0), 0.0);
    assert_eq!(rt_label(-1), "0.1 ms");
    assert_eq!(rt_label(0), "1 ms");
    assert_eq!(rt_label(2), "100 ms");
    assert_eq!(rt_label(3), "1 s");
    assert_eq!(rt_label(4), "10 s");
    let p = |rt: f64| Panel {
        samples: vec![(0.0, rt)],
        ..Panel::default()
    };
    assert_eq!(y_max_ms(&[p(0.5)], -1.0, 1.0), 10.0);
    assert_eq!(y_max_ms(&[p(10.0)], -1.0, 1.0), 10.0);
    assert_eq!(y_max_ms(&[p(10.5)], -1.0, 1.0), 100.0);
    assert_eq!(y_max_ms(&[p(0.5), p(1300.0)], -1.0, 1.0), 10_000.0);
    assert_eq!(y_max_ms(&[p(1300.0)], 1.0, 2.0), 10.0, "outside the window");
}

#[test]
fn time_ticks_are_nice() {
    for (t0, t1) in [
        (0.0, 1.0),
        (-200.0, 900.0),
        (-500.0, 2500.0),
        (0.0, 9999.9),
        (-1234.5, 67_890.0),
        (3.3, 3.7),
        (-1e12, 1e12),
    ] {
        let ticks = time_ticks(t0, t1);
        let n = ticks.at_ms.len();
        assert!(
            (5..=11).contains(&n),
            "{t0}..{t1}: {n} ticks {:?}",
            ticks.labels
        );
        let eps = (t1 - t0) * 1e-9;
        assert!(ticks.at_ms.iter().all(|t| *t >= t0 - eps && *t <= t1 + eps));
        assert_eq!(ticks.in_seconds, t1 - t0 > 5000.0);
        let step = ticks.at_ms[1] - ticks.at_ms[0];
        let mantissa = step / 10f64.powf(step.log10().floor());
        assert!(
            [1.0, 2.0, 5.0].iter().any(|m| (mantissa - m).abs() < 1e-6),
            "{t0}..{t1}: step {step}"
        );
    }
    assert_eq!(time_ticks(-300.0, 1815.0).at_ms.len(), 11);
    let ticks = time_ticks(-200.0, 900.0);
    assert!(
        ticks.labels.contains(&"0".to_string()),
        "{:?}",
        ticks.labels
    );
    assert!(!ticks.labels.iter().any(|l| l.starts_with("-0")));
    assert_eq!(time_ticks(0.0, 9999.9).labels[1], "2");
    assert_eq!(
        time_ticks(3.3, 3.7).labels,
        ["3.3", "3.4", "3.5", "3.6", "3.7"]
    );
    assert_eq!(
        time_ticks(-2.0, 13.0).labels,
        ["-2", "0", "2", "4", "6", "8", "10", "12"]
    );
}

#[test]
fn window_with_phases() {
    let panels = two_panels();
    // Phases 0..950, gap 100..220.
    assert_eq!(window(&panels, 200.0, 500.0), (-200.0, 1450.0));
    assert_eq!(window(&panels, f64::NAN, -3.0), (0.0, 950.0));

    // A gap that ends after every phase widens the end.
    let mut panels = two_panels();
    panels[1].largest_gap = Some((900.0, 1300.0));
    assert_eq!(window(&panels, 100.0, 100.0), (-100.0, 1400.0));

    // Phases in one panel only still count; non-finite ones do not.
    let panels = vec![
        Panel::default(),
        Panel {
            phases: vec![span("dump", f64::NAN, 5.0), span("restore", 10.0, 40.0)],
            ..Panel::default()
        },
    ];
    assert_eq!(window(&panels, 10.0, 10.0), (0.0, 50.0));
}

#[test]
fn window_without_phases() {
    let mut panels = two_panels();
    for p in &mut panels {
        p.phases.clear();
    }
    panels[1].samples.push((2500.0, 1.0));
    assert_eq!(window(&panels, 200.0, 500.0), (-500.0, 2500.0));
    assert_eq!(window(&[Panel::default()], 200.0, 500.0), (-200.0, 500.0));
    assert_eq!(window(&[], 0.0, 0.0), (-500.0, 500.0));
    let one = Panel {
        samples: vec![(7.0, 1.0), (f64::NAN, 1.0)],
        ..Panel::default()
    };
    assert_eq!(window(&[one], 0.0, 0.0), (-493.0, 507.0));
}

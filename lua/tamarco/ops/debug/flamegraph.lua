--- tamarco.ops.debug.flamegraph: folded stacks -> a self-contained interactive
-- flame graph SVG (no external script, font or style). Hovering a frame
-- shows its name, samples and share; clicking zooms into it; "Reset zoom"
-- goes back. The same script is exported (flamegraph.SCRIPT) for pages that
-- insert the SVG inline and call tamarcoFlame(svgElement) themselves.
local flamegraph = {}

local WIDTH = 1200
local PAD = 10
local FRAME_H = 17
local TOP = 36
local BOTTOM = 24
local MIN_PX = 0.3

flamegraph.SCRIPT = [[
function tamarcoFlame(svg) {
  var W = +svg.getAttribute('data-width'), pad = 10;
  var frames = Array.prototype.slice.call(svg.querySelectorAll('g.f'));
  var details = svg.querySelector('.details');
  function fit(g, x, w) {
    var r = g.querySelector('rect'), t = g.querySelector('text');
    if (w < 0.5) { g.style.display = 'none'; return; }
    g.style.display = '';
    r.setAttribute('x', x); r.setAttribute('width', w); t.setAttribute('x', x + 3);
    var n = g.getAttribute('data-n'), c = Math.floor((w - 6) / 7);
    t.textContent = c < 3 ? '' : (n.length > c ? n.slice(0, c - 2) + '..' : n);
  }
  function zoom(g) {
    var x0 = +g.getAttribute('data-x'), w0 = +g.getAttribute('data-w'), d0 = +g.getAttribute('data-d');
    var scale = (W - 2 * pad) / w0;
    frames.forEach(function (f) {
      var x = +f.getAttribute('data-x'), w = +f.getAttribute('data-w'), d = +f.getAttribute('data-d');
      var covers = x <= x0 + 1e-6 && x + w >= x0 + w0 - 1e-6;
      var inside = x >= x0 - 1e-6 && x + w <= x0 + w0 + 1e-6;
      if (d < d0 && covers) { fit(f, pad, W - 2 * pad); f.style.opacity = 0.6; }
      else if (d >= d0 && inside) { fit(f, pad + (x - x0) * scale, w * scale); f.style.opacity = ''; }
      else { f.style.display = 'none'; }
    });
  }
  frames.forEach(function (f) {
    f.addEventListener('click', function (e) { zoom(f); e.stopPropagation(); });
    f.addEventListener('mouseover', function () { details.textContent = f.querySelector('title').textContent; });
    f.addEventListener('mouseout', function () { details.textContent = ' '; });
  });
  var reset = svg.querySelector('.reset');
  if (reset) reset.addEventListener('click', function () { zoom(frames[0]); });
}
]]

local function escape(s)
    return (tostring(s):gsub("[&<>\"]", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;" }))
end
flamegraph.escape = escape

local function color(name)
    if name:find("^%[idle") then return "rgb(170,190,215)" end
    if name:find("^%[") then return "rgb(120,190,120)" end
    local h = 0
    for i = 1, #name do h = (h * 31 + name:byte(i)) % 1000003 end
    return ("rgb(%d,%d,%d)"):format(205 + h % 50, 80 + math.floor(h / 50) % 120, 40 + math.floor(h / 6000) % 40)
end

-- folded { [stack] = samples } -> tree { name, value, children (list) }
local function build_tree(folded)
    local root = { name = "all", value = 0, children = {}, index = {} }
    local stacks = {}
    for stack in pairs(folded) do stacks[#stacks + 1] = stack end
    table.sort(stacks)
    for _, stack in ipairs(stacks) do
        local n = folded[stack]
        root.value = root.value + n
        local node = root
        for frame in stack:gmatch("[^;]+") do
            local child = node.index[frame]
            if not child then
                child = { name = frame, value = 0, children = {}, index = {} }
                node.index[frame] = child
                node.children[#node.children + 1] = child
            end
            child.value = child.value + n
            node = child
        end
    end
    return root
end

local function depth_of(node)
    local d = 0
    for _, child in ipairs(node.children) do d = math.max(d, depth_of(child)) end
    return d + 1
end

--- flamegraph.svg(folded[, title]) -> SVG text.
function flamegraph.svg(folded, title)
    local root = build_tree(folded)
    local depth = depth_of(root)
    local height = TOP + depth * FRAME_H + BOTTOM
    local total = math.max(root.value, 1)
    local px_per_sample = (WIDTH - 2 * PAD) / total
    local out = {
        ('<svg xmlns="http://www.w3.org/2000/svg" class="tamarco-flamegraph" width="%d" height="%d" '
            .. 'viewBox="0 0 %d %d" data-width="%d" font-family="monospace" font-size="12">')
            :format(WIDTH, height, WIDTH, height, WIDTH),
        '<style>g.f{cursor:pointer} g.f:hover rect{stroke:#000;stroke-width:0.5} text{pointer-events:none}</style>',
        ('<rect x="0" y="0" width="%d" height="%d" fill="#fdf8ee"/>'):format(WIDTH, height),
        ('<text x="%d" y="20" font-size="15" text-anchor="middle">%s</text>'):format(WIDTH / 2,
            escape(title or "CPU flame graph")),
        ('<text class="reset" x="%d" y="20" style="cursor:pointer" fill="#1a4f9c">Reset zoom</text>'):format(PAD),
        ('<text class="details" x="%d" y="%d"> </text>'):format(PAD, height - 8),
    }
    local function emit(node, x, d)
        local w = node.value * px_per_sample
        if w < MIN_PX then return end
        local y = height - BOTTOM - (d + 1) * FRAME_H
        local share = 100 * node.value / total
        local chars = math.floor((w - 6) / 7)
        local label = chars < 3 and "" or (#node.name > chars and node.name:sub(1, chars - 2) .. ".." or node.name)
        out[#out + 1] = ('<g class="f" data-n="%s" data-x="%.3f" data-w="%.3f" data-d="%d"><title>%s (%d samples, %.2f%%)</title>'
            .. '<rect x="%.3f" y="%d" width="%.3f" height="%d" rx="2" fill="%s"/>'
            .. '<text x="%.3f" y="%d">%s</text></g>'):format(escape(node.name), x, w, d, escape(node.name),
                node.value, share, x, y, w, FRAME_H - 1, color(node.name), x + 3, y + FRAME_H - 5, escape(label))
        local cx = x
        table.sort(node.children, function(a, b) return a.name < b.name end)
        for _, child in ipairs(node.children) do
            emit(child, cx, d + 1)
            cx = cx + child.value * px_per_sample
        end
    end
    emit(root, PAD, 0)
    out[#out + 1] = "<script><![CDATA[" .. flamegraph.SCRIPT
        .. "if (document.documentElement.namespaceURI === 'http://www.w3.org/2000/svg') "
        .. "tamarcoFlame(document.documentElement);]]></script>"
    out[#out + 1] = "</svg>"
    return table.concat(out, "\n")
end

return flamegraph
